"""Same weights, two pipelines: a voxseg-trained model through voxseg's predictor and through nnU-Net's.

The model is exported as an nnU-Net v2 model folder (`voxseg export --format nnunet`), then the same test images
(typically at a spacing other than the training spacing, so both pipelines resample in and out) are predicted by
`voxseg predict` and by nnU-Net 2.8.1's nnUNetPredictor (in benchmarks/.venv-nnunet, created by
`python benchmarks/augment_bench.py --setup-nnunet`), and both are scored with `voxseg evaluate`.

    voxseg synth /tmp/spc --cases 1 --test-cases 8 --shape 40,56,52 --spacing 1.3,0.85,0.9 --seed 11
    python benchmarks/same_weights_spacing.py voxseg_work/demo/model /tmp/spc --folds 0

Prints per-class Dice of both pipelines and writes benchmarks/results/same_weights_spacing.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_PYTHON = HERE / ".venv-nnunet" / "bin" / "python"

NNUNET_PREDICT = """
import sys, torch
import nnunetv2.inference.predict_from_raw_data as predict_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
# nnU-Net's trainer lookup imports every trainer module (some need packages this venv lacks): name it directly
predict_module.recursive_find_trainer_class_by_name = lambda name: nnUNetTrainer
torch.set_num_threads(int(sys.argv[4]))
folds = tuple(int(f) for f in sys.argv[5].split(","))
predictor = predict_module.nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                           perform_everything_on_device=False, device=torch.device("cpu"),
                                           verbose=False, verbose_preprocessing=False, allow_tqdm=False)
predictor.initialize_from_trained_model_folder(sys.argv[1], use_folds=folds, checkpoint_name="checkpoint_final.pth")
predictor.predict_from_files(sys.argv[2], sys.argv[3], save_probabilities=False, overwrite=True,
                             num_processes_preprocessing=1, num_processes_segmentation_export=1)
"""


def run(command: list[str], threads: int = 0) -> float:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def scores(pred: Path, data: Path) -> dict[str, float]:
    subprocess.run([sys.executable, "-m", "voxseg", "evaluate", str(pred), str(data / "labelsTs"), "--dataset-json",
                    str(data / "dataset.json")], check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((pred / "summary.json").read_text())
    per_class = {name: round(float(v["dice"]), 4) for name, v in summary["mean"].items()}
    per_class["foreground mean"] = round(float(summary["foreground_mean"]["dice"]), 4)
    return per_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path, help="a trained voxseg work directory")
    parser.add_argument("data", type=Path, help="a dataset folder with imagesTs/, labelsTs/ and dataset.json")
    parser.add_argument("--folds", default="0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "same_weights_spacing.json")
    args = parser.parse_args()
    if not VENV_PYTHON.is_file():
        sys.exit(f"no {VENV_PYTHON}: create it with python benchmarks/augment_bench.py --setup-nnunet")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "nnUNetTrainer__voxsegPlans__3d_fullres"
        run([sys.executable, "-m", "voxseg", "export", str(args.workdir), "--folds", args.folds, "--format", "nnunet",
             str(folder)])
        voxseg_s = run([sys.executable, "-m", "voxseg", "predict", "-m", str(args.workdir), "-i",
                        str(args.data / "imagesTs"), "-o", str(root / "voxseg"), "--device", "cpu", "--folds",
                        args.folds], args.threads)
        nnunet_s = run([str(VENV_PYTHON), "-c", NNUNET_PREDICT, str(folder), str(args.data / "imagesTs"),
                        str(root / "nnunet"), str(args.threads), args.folds], args.threads)
        result = {"workdir": str(args.workdir), "data": str(args.data), "folds": args.folds,
                  "voxseg": scores(root / "voxseg", args.data), "nnunet": scores(root / "nnunet", args.data),
                  "seconds": {"voxseg": round(voxseg_s, 1), "nnunet": round(nnunet_s, 1)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'class':<18} {'voxseg':>8} {'nnU-Net':>8}")
    for name in result["voxseg"]:
        print(f"{name:<18} {result['voxseg'][name]:>8.4f} {result['nnunet'][name]:>8.4f}")
    print(f"wall time (s): voxseg {result['seconds']['voxseg']}, nnU-Net {result['seconds']['nnunet']}")


if __name__ == "__main__":
    main()
