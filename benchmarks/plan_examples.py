"""The configurations voxseg plans for two synthetic fingerprints (the worked examples of docs/PLANNING.md).

    python benchmarks/plan_examples.py [--gpu-memory 8]

- BraTS-like: 4 MRI channels, 1 mm isotropic, 400 cases with a median brain crop of 134x168x138, 4 outputs.
- Abdomen CT-like, large and anisotropic: 1 CT channel, 2.5 x 0.8 x 0.8 mm, 100 cases of 400x512x512 voxels,
  3 outputs (3d_lowres and the cascade apply).

Each configuration is printed with its spacing, median shape, patch x batch, strides and memory estimate.
The fingerprints are built in memory (no images are read); nothing is written.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from voxseg.data.dataset import RawDataset
from voxseg.data.plan import make_plans

CT_STATS = {"0": {"mean": 60.0, "std": 80.0, "median": 55.0, "min": -1000.0, "max": 2000.0,
                  "percentile_00_5": -150.0, "percentile_99_5": 300.0}}
EXAMPLES = {
    "BraTS-like": dict(channels={"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
                       labels={"background": 0, "edema": 1, "core": 2, "enhancing": 3},
                       spacing=[1.0, 1.0, 1.0], shape=[134, 168, 138], cases=400, relative=0.45, stats={}),
    "CT, large and anisotropic": dict(channels={"0": "CT"}, labels={"background": 0, "liver": 1, "tumour": 2},
                                      spacing=[2.5, 0.8, 0.8], shape=[400, 512, 512], cases=100, relative=0.9,
                                      stats=CT_STATS),
}


def fingerprint(example: dict) -> dict:
    n = example["cases"]
    return {"spacings": [example["spacing"]] * n, "shapes_after_crop": [example["shape"]] * n,
            "median_relative_size_after_cropping": example["relative"], "foreground_intensity": example["stats"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-memory", type=float, default=8.0)
    args = parser.parse_args()
    for title, example in EXAMPLES.items():
        dataset = RawDataset(Path("/data/Example"), {"name": "Example", "channel_names": example["channels"],
                                                     "labels": example["labels"], "file_ending": ".nii.gz"})
        plans = make_plans(fingerprint(example), dataset, gpu_memory_gb=args.gpu_memory)
        print(f"{title}: spacing {example['spacing']}, median shape {example['shape']}, {example['cases']} cases, "
              f"{args.gpu_memory:g} GiB")
        for name, plan in plans.items():
            coverage = math.prod(plan.patch_size) / math.prod(
                [s for a, s in enumerate(plan.median_shape_after_resample)
                 if plan.network.ndim == 3 or a != plan.slice_axis])
            spacing = "x".join(f"{s:.3g}" for s in plan.target_spacing)
            extra = f" slice axis {plan.slice_axis}" if plan.network.ndim == 2 else ""
            extra += f" after {plan.previous_stage}" if plan.previous_stage else ""
            print(f"  {name:<19} spacing {spacing:<16} median {plan.median_shape_after_resample} patch "
                  f"{plan.patch_size} x {plan.batch_size} (covers {coverage:.0%}) strides {plan.network.strides[1:]} "
                  f"~{plan.estimated_memory_gb:.1f} GiB{extra}")


if __name__ == "__main__":
    main()
