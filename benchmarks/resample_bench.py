"""Image resampling: voxseg's torch splines against nnU-Net v2's resample_data_or_seg_to_shape (scipy/skimage).

Run with the nnU-Net venv's interpreter and this checkout on the path, one thread for both:

    PYTHONPATH=$PWD benchmarks/.venv-nnunet/bin/python benchmarks/resample_bench.py --repeats 2

Cases: 4 x 140 x 170 x 140 at 1 mm to 1.2 x 0.85 x 0.9 mm (third-order splines in 3D), 1 x 32 x 224 x 224 at
5 x 0.8 x 0.8 mm to 3 x 0.75 x 0.75 mm (separate coarse axis: cubic per slice, nearest along it), and 4-channel
logits of the first case back to its 1 mm grid (linear). Prints CPU and wall seconds (best of --repeats) and the largest
absolute difference between the two results.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def best_time(fn, repeats: int) -> tuple[float, float, object]:
    """(best wall seconds, best CPU seconds of this process, result); CPU time is what a loaded machine
    does not inflate (one thread)."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return wall, cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, resample_data_or_seg_to_shape
    from scipy import ndimage

    from voxseg.data.preprocess import new_shape_for_spacing
    from voxseg.data.resample import OUTPUT_ORDER, resample, separate_axis

    rng = np.random.default_rng(0)
    smooth = lambda shape: ndimage.gaussian_filter(rng.normal(size=shape), 1.5).astype(np.float32) * 10  # noqa: E731
    cases = [
        ("4x140x170x140, 1 mm -> 1.2x0.85x0.9 mm", np.stack([smooth((140, 170, 140)) for _ in range(4)]),
         (1.0, 1.0, 1.0), (1.2, 0.85, 0.9), 3),
        ("1x32x224x224, 5x0.8x0.8 mm -> 3x0.75x0.75 mm", smooth((1, 32, 224, 224)),
         (5.0, 0.8, 0.8), (3.0, 0.75, 0.75), 3),
        ("logits 4x117x200x156 back to 1 mm (order 1)", np.stack([smooth((117, 200, 156)) for _ in range(4)]),
         (1.2, 0.85, 0.9), (1.0, 1.0, 1.0), OUTPUT_ORDER),
    ]
    print(f"threads {args.threads}, best of {args.repeats}")
    print("| case | voxseg CPU s (wall) | nnU-Net resample_data_or_seg_to_shape CPU s (wall) | CPU speed-up | "
          "max abs difference |")
    print("|---|---|---|---|---|")
    for name, data, spacing, target, order in cases:
        shape = list(data.shape[1:])
        if name.startswith("logits"):
            shape = [140, 170, 140]  # the crop's shape before preprocessing
        else:
            shape = new_shape_for_spacing(shape, spacing, target)
            assert list(compute_new_shape(data.shape[1:], spacing, target)) == shape
        axis = separate_axis(spacing, target)
        tensor = torch.from_numpy(data)
        w_vox, t_vox, ours = best_time(lambda: resample(tensor, shape, anisotropy_axis=axis, order=order), args.repeats)
        w_nn, t_nn, theirs = best_time(lambda: resample_data_or_seg_to_shape(
            data, shape, spacing, target, is_seg=False, order=order, order_z=0, force_separate_z=None), args.repeats)
        diff = float(np.abs(ours.numpy() - theirs).max())
        print(f"| {name} (separate axis {axis}) | {t_vox:.2f} ({w_vox:.2f}) | {t_nn:.2f} ({w_nn:.2f}) | "
              f"{t_nn / t_vox:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
