"""`voxseg import nnunet` and `voxseg export --format nnunet` against nnU-Net's own code.

Run with the python of an environment that has nnunetv2 installed:

    benchmarks/.venv-nnunet/bin/python benchmarks/nnunet_import_check.py [--voxseg-python /path/to/python]

For PlainConvUNet and ResidualEncoderUNet (built by nnU-Net's `get_network_from_plans`, with trained-looking
weights) it writes an nnU-Net model folder (as benchmarks/nnunet_parity.py does), then in voxseg's python:
imports it with `import_nnunet`, computes the imported work directory's logits (`network_from_checkpoint`, the
path every voxseg command takes) and exports the work directory back with `export_nnunet`. Back here, nnU-Net's
predictor loads the exported folder (`nnUNetPredictor.initialize_from_trained_model_folder`, strict
`load_state_dict`) and its network's logits are compared with nnU-Net's original network and voxseg's; then
it predicts one image end to end (nnU-Net's preprocessing and sliding window) to show the folder runs there.
Fails when any logit differs by more than 1e-4.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nnunet_parity import REPO, model_folder_with_reference, run_for_both_networks  # noqa: E402

VOXSEG_SIDE = """
import sys, torch
from voxseg.checkpoint import network_from_checkpoint
from voxseg.infer.nnunet_export import export_nnunet
from voxseg.infer.nnunet_import import import_nnunet
folder, root = sys.argv[1], sys.argv[2]
result = import_nnunet(folder, root + "/work")
net, plan, _ = network_from_checkpoint(root + "/work/training/fold_0/checkpoint_final.pt")
with torch.no_grad():
    torch.save(net(torch.load(folder + "/input.pt")), root + "/imported_logits.pt")
exported = export_nnunet(root + "/work", root + "/exported", folds=[0])
print(exported)
"""


def nnunet_predictor(folder: Path):
    """nnU-Net's predictor for a model folder; the trainer class is imported directly (nnU-Net's name lookup
    imports every trainer module, some of which need packages this environment lacks)."""
    import nnunetv2.inference.predict_from_raw_data as predict_module
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    predict_module.recursive_find_trainer_class_by_name = lambda name: nnUNetTrainer
    predictor = predict_module.nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                               perform_everything_on_device=False, device=torch.device("cpu"),
                                               verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    return predictor


def check(arch: dict, voxseg_python: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder, image, reference = model_folder_with_reference(root, arch)
        run = subprocess.run([voxseg_python, "-c", VOXSEG_SIDE, str(folder), str(root)], cwd=REPO,
                             capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"voxseg failed:\n{run.stderr}")
        imported = torch.load(root / "imported_logits.pt")
        predictor = nnunet_predictor(Path(run.stdout.strip().splitlines()[-1]))
        with torch.no_grad():
            exported = predictor.network(image)
        case = np.random.default_rng(0).normal(0.0, 1.0, (2, 20, 48, 40)).astype(np.float32)
        labels = predictor.predict_single_npy_array(case, {"spacing": [3.0, 0.8, 0.8]})
    name = arch["network_class_name"].rsplit(".", 1)[-1]
    import_diff = float((imported - reference).abs().max())
    export_diff = float((exported - reference).abs().max())
    print(f"{name}: max |imported work dir - nnU-Net| logits = {import_diff:.2e}, max |exported folder in nnU-Net's "
          f"predictor - nnU-Net| = {export_diff:.2e} (logit range {float(reference.abs().max()):.2f}); nnU-Net's "
          f"predictor segmented a {case.shape[1:]} case from the exported folder: labels {np.unique(labels).tolist()}")
    return max(import_diff, export_diff)


def main() -> None:
    run_for_both_networks(__doc__.splitlines()[0], check)


if __name__ == "__main__":
    main()
