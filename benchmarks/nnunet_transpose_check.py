"""voxseg against nnU-Net v2's own predictor on models planned with transposed axes: 3d_fullres and 2d.

Run with the python of an environment that has nnunetv2 installed:

    benchmarks/.venv-nnunet/bin/python benchmarks/nnunet_transpose_check.py [--voxseg-python /path/to/python]

For PlainConvUNet and ResidualEncoderUNet, in a 3d_fullres and a 2d configuration whose plans.json has
transpose_forward [2, 0, 1] (the coarse case axis 2 first, as nnU-Net's planner writes it for such data), it
builds the network with nnU-Net's get_network_from_plans (random weights, norms and biases moved off their
initial values), writes the model folder, and segments one random case of spacing 0.9 x 0.8 x 3.0 mm (another
grid than the plans' spacing: both tools resample there and back) twice: with nnU-Net's nnUNetPredictor
(manual_initialization, predict_single_npy_array: its preprocessing transposes the case, its export transposes
back) and with voxseg's Predictor.from_workdir(model folder).predict_array in a subprocess of voxseg's python.
Mirroring is on (the checkpoint allows nnU-Net's axes 0 and 2), tile step 0.5, Gaussian, CPU. It prints the
voxel agreement of the label maps and max |p_voxseg - p_nnU-Net|. nnU-Net accumulates the tiles and its Gaussian in
float16; --nnunet-fp32 runs its predictor in float32 instead (as benchmarks/nnunet_predict_compare.py does), which shows
what is left of the difference: then the script fails when the maps differ in more than 0.1% of the voxels or a
probability by more than 1e-4 (without it: more than 1% of the voxels).
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nnunet_parity import PLAIN, REPO, RESENC, perturbed_network  # noqa: E402
from nnunet_predict_compare import _TorchFloat32  # noqa: E402

FORWARD = [2, 0, 1]
SPACING_3D = [3.0, 1.0, 1.0]  # nnU-Net's transposed order: the case's axis 2 (coarse) first
CASE_SHAPE, CASE_SPACING = (26, 30, 9), (0.9, 0.8, 3.0)
VOXSEG = """
import sys, numpy as np
from voxseg.infer.predictor import Predictor
folder = sys.argv[1]
predictor = Predictor.from_workdir(folder, folds=0, device="cpu")
labels, probs = predictor.predict_array(np.load(folder + "/case.npy"), (0.9, 0.8, 3.0), return_probabilities=True)
np.save(folder + "/voxseg_labels.npy", labels)
np.save(folder + "/voxseg_probs.npy", probs)
print("voxseg: patch", predictor.plan.patch_size, "slice axis", predictor.plan.slice_axis,
      "mirror", predictor.mirror_axes)
"""


def architecture(base: dict, ndim: int) -> dict:
    arch = copy.deepcopy(base)
    kwargs = arch["arch_kwargs"]
    kwargs.update(n_stages=3, features_per_stage=[8, 16, 32], n_conv_per_stage_decoder=kwargs[
        "n_conv_per_stage_decoder"][:2])
    kwargs.update({k: v[:3] for k, v in kwargs.items() if k in ("n_conv_per_stage", "n_blocks_per_stage")})
    if ndim == 3:
        kwargs.update(kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]], strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]])
    else:
        kwargs.update(conv_op="torch.nn.modules.conv.Conv2d", norm_op="torch.nn.modules.instancenorm.InstanceNorm2d",
                      kernel_sizes=[[3, 3], [3, 3], [3, 3]], strides=[[1, 1], [2, 2], [2, 2]])
    return arch


def write_model_folder(folder: Path, network: torch.nn.Module, arch: dict, configuration: str) -> dict:
    ndim = 3 if configuration == "3d_fullres" else 2
    config = {"data_identifier": f"nnUNetPlans_{configuration}", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": 2, "patch_size": [8, 16, 16] if ndim == 3 else [32, 32],
              "median_image_size_in_voxels": [9, 29, 32][3 - ndim:], "spacing": SPACING_3D[3 - ndim:],
              "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
              "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
              "resampling_fn_seg": "resample_data_or_seg_to_shape",
              "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
              "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
              "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                     "force_separate_z": None},
              "architecture": arch, "batch_dice": True}
    plans = {"dataset_name": "Dataset998_Transposed", "plans_name": "nnUNetPlans", "transpose_forward": FORWARD,
             "transpose_backward": [FORWARD.index(a) for a in range(3)], "configurations": {configuration: config},
             "original_median_spacing_after_transp": SPACING_3D, "original_median_shape_after_transp": [9, 29, 32],
             "image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager",
             "foreground_intensity_properties_per_channel": {"0": {}}}
    dataset = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 2,
               "file_ending": ".nii.gz"}
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    (folder / "fold_0").mkdir()
    torch.save({"network_weights": network.state_dict(), "optimizer_state": {}, "grad_scaler_state": None,
                "logging": {}, "current_epoch": 1000, "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": plans, "configuration": configuration, "fold": 0, "dataset_json": dataset},
                "inference_allowed_mirroring_axes": (0, 2) if ndim == 3 else (0, 1)},
               folder / "fold_0" / "checkpoint_final.pth")
    return {"plans": plans, "dataset": dataset}


def check(base: dict, configuration: str, voxseg_python: str, fp32: bool = False) -> tuple[float, float]:
    import functools

    import nnunetv2.inference.predict_from_raw_data as raw
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if fp32:  # nnU-Net's accumulators and Gaussian (float16 in nnU-Net) in float32
        raw.torch = _TorchFloat32("torch")
        gaussian = functools.partial(raw.compute_gaussian, dtype=torch.float32)
        gaussian.cache_clear = raw.compute_gaussian.cache_clear
        raw.compute_gaussian = gaussian
    ndim = 3 if configuration == "3d_fullres" else 2
    arch = architecture(base, ndim)
    network = perturbed_network(arch, 1, 3, deep_supervision=False)
    rng = np.random.default_rng(0)
    case = rng.normal(100.0, 20.0, (1, *CASE_SHAPE)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / f"nnUNetTrainer__nnUNetPlans__{configuration}"
        folder.mkdir()
        written = write_model_folder(folder, network, arch, configuration)
        np.save(folder / "case.npy", case)
        plans = PlansManager(written["plans"])
        predictor = raw.nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                    perform_everything_on_device=False, device=torch.device("cpu"),
                                    allow_tqdm=False)
        predictor.manual_initialization(network, plans, plans.get_configuration(configuration), [network.state_dict()],
                                        written["dataset"], "nnUNetTrainer", (0, 2) if ndim == 3 else (0, 1))
        labels, probs = predictor.predict_single_npy_array(case, {"spacing": list(CASE_SPACING)}, None, None, True)
        run = subprocess.run([voxseg_python, "-c", VOXSEG, str(folder)], cwd=REPO, capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"voxseg failed on the model folder:\n{run.stderr}")
        ours, ours_probs = np.load(folder / "voxseg_labels.npy"), np.load(folder / "voxseg_probs.npy")
    assert ours.shape == labels.shape == CASE_SHAPE, (ours.shape, labels.shape)
    agreement = float((ours == labels).mean())
    diff = float(np.abs(ours_probs.astype(np.float32) - probs.astype(np.float32)).max())
    name = arch["network_class_name"].rsplit(".", 1)[-1]
    print(f"{name} {configuration}, transpose_forward {FORWARD}, case {CASE_SHAPE} at {CASE_SPACING} mm: "
          f"labels agree on {100 * agreement:.3f}% of voxels ({len(np.unique(labels))} labels), "
          f"max |p_voxseg - p_nnU-Net| = {diff:.2e}{' (nnU-Net in float32)' if fp32 else ''}; {run.stdout.strip()}")
    return agreement, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nnunet-fp32", action="store_true", help="nnU-Net's predictor accumulates in float32")
    parser.add_argument("--voxseg-python", default=shutil.which("python3") or "python3",
                        help="the Python that has voxseg installed (default: python3 on PATH)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = [check(base, configuration, args.voxseg_python, args.nnunet_fp32)
               for configuration in ("3d_fullres", "2d") for base in (PLAIN, RESENC)]
    # float32 on both sides: the same function up to float rounding; float16 in nnU-Net: its rounding, which tiny
    # Gaussian weights at the edges of a small patch make large, so only the label maps are held to a bound
    agree, worst = (0.999, 1e-4) if args.nnunet_fp32 else (0.99, 1.0)
    sys.exit(0 if all(a >= agree and d <= worst for a, d in results) else 1)


if __name__ == "__main__":
    main()
