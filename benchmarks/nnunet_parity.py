"""Parity of voxseg's nnU-Net adapter with dynamic_network_architectures' PlainConvUNet and ResidualEncoderUNet.

Run with the python of an environment that has nnunetv2 / dynamic_network_architectures installed:

    benchmarks/.venv-nnunet/bin/python benchmarks/nnunet_parity.py [--voxseg-python /path/to/python]

For each network it builds the network from nnU-Net-style arch_kwargs (as its planner writes them), saves an
nnU-Net-style model folder (plans.json, dataset.json, fold_0/checkpoint_final.pth with the dict nnU-Net's trainer
saves), then loads that folder with voxseg's adapter in a subprocess of voxseg's own python and compares the logits
(same weights, so they must agree to float rounding; the script fails above 1e-4).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PLAIN = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 4, "features_per_stage": [8, 16, 32, 64], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
RESENC = {  # as nnU-Net's ResEnc planners write it: blocks [1, 3, 4, 6], one conv per decoder level
    "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    "arch_kwargs": {**{k: v for k, v in PLAIN["arch_kwargs"].items() if k != "n_conv_per_stage"},
                    "n_blocks_per_stage": [1, 3, 4, 6], "n_conv_per_stage_decoder": [1, 1, 1]},
    "_kw_requires_import": PLAIN["_kw_requires_import"],
}
PATCH = [16, 32, 32]
LOADER = """
import sys, torch
from voxseg.infer.nnunet import load_nnunet_fold
from voxseg.infer.nnunet_folder import nnunet_folds
folder = sys.argv[1]
net, plan, axes = load_nnunet_fold(folder, nnunet_folds(folder, 0, "final")[0])
with torch.no_grad():
    torch.save(net(torch.load(folder + "/input.pt")), folder + "/voxseg_logits.pt")
print("mirror axes", axes, "outputs", plan.num_outputs)
"""


def write_model_folder(folder: Path, network: torch.nn.Module, arch: dict) -> None:
    """plans.json, dataset.json and fold_0/checkpoint_final.pth as nnU-Net v2 writes them (trimmed)."""
    config = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": 2, "patch_size": PATCH, "median_image_size_in_voxels": [40, 64, 64],
              "spacing": [3.0, 0.8, 0.8], "normalization_schemes": ["ZScoreNormalization", "CTNormalization"],
              "use_mask_for_norm": [True, False], "architecture": arch}
    plans = {"dataset_name": "Dataset999_Parity", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": config},
             "original_median_spacing_after_transp": [3.0, 0.8, 0.8],
             "original_median_shape_after_transp": [40, 64, 64],
             "foreground_intensity_properties_per_channel": {
                 "1": {"mean": 40.0, "std": 50.0, "percentile_00_5": -100.0, "percentile_99_5": 300.0}}}
    dataset = {"channel_names": {"0": "T2", "1": "CT"}, "labels": {"background": 0, "a": 1, "b": 2},
               "numTraining": 2, "file_ending": ".nii.gz"}
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    (folder / "fold_0").mkdir()
    logs = {"ema_fg_dice": [np.float64(0.5)], "dice_per_class_or_region": [[np.float64(0.4), np.float64(0.6)]]}
    torch.save({"network_weights": network.state_dict(), "optimizer_state": {}, "grad_scaler_state": None,
                "logging": logs, "_best_ema": np.float64(0.5), "current_epoch": 1000,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                              "device": torch.device("cpu")},
                "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)},
               folder / "fold_0" / "checkpoint_final.pth")


def perturbed_network(arch: dict, in_channels: int, out_channels: int, deep_supervision: bool) -> torch.nn.Module:
    """nnU-Net's network for `arch` (seeded), in eval mode, with trained-looking norms and biases (not the
    identity/zero init), so that a mapping error cannot hide behind them."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.manual_seed(0)
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     in_channels, out_channels, deep_supervision=deep_supervision)
    for param in network.parameters():
        param.data.add_(0.1 * torch.randn_like(param))
    return network.eval()


def model_folder_with_reference(root: Path, arch: dict) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A 3d_fullres model folder under `root` holding the perturbed network and a random (2, 2, *PATCH) input.pt;
    returns the folder, the input and nnU-Net's logits for it (full resolution only)."""
    network = perturbed_network(arch, 2, 3, deep_supervision=True)
    folder = root / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    folder.mkdir()
    write_model_folder(folder, network, arch)
    image = torch.randn(2, 2, *PATCH)
    torch.save(image, folder / "input.pt")
    network.decoder.deep_supervision = False
    with torch.no_grad():
        reference = network(image)
    return folder, image, reference


def parity(arch: dict, voxseg_python: str) -> float:
    """max |voxseg - nnU-Net| logits for one architecture, on a random (2, 2, *PATCH) input."""
    with tempfile.TemporaryDirectory() as tmp:
        folder, image, reference = model_folder_with_reference(Path(tmp), arch)
        run = subprocess.run([voxseg_python, "-c", LOADER, str(folder)], cwd=REPO, capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"voxseg failed to load the model folder:\n{run.stderr}")
        ours = torch.load(folder / "voxseg_logits.pt")
    diff = float((ours - reference).abs().max())
    name = arch["network_class_name"].rsplit(".", 1)[-1]
    print(f"{name}, 4 stages, input {tuple(image.shape)}: max |voxseg - nnU-Net| logits = {diff:.2e} "
          f"(logit range {float(reference.abs().max()):.2f}; {run.stdout.strip()})")
    return diff


def run_for_both_networks(description: str, check) -> None:
    """`check(arch, voxseg_python)` for PlainConvUNet and ResidualEncoderUNet; exit 1 when either differs by 1e-4."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--voxseg-python", default=shutil.which("python3") or "python3",
                        help="the Python that has voxseg installed (default: python3 on PATH)")
    args = parser.parse_args()
    worst = max(check(arch, args.voxseg_python) for arch in (PLAIN, RESENC))
    sys.exit(0 if worst < 1e-4 else 1)


def main() -> None:
    run_for_both_networks(__doc__.splitlines()[0], parity)


if __name__ == "__main__":
    main()
