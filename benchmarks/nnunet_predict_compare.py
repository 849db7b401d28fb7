"""voxseg against nnU-Net v2's own predictor on one nnU-Net-trained model: label agreement, probabilities, Dice, time.

Steps (everything under --work, default a temporary folder):
  1. two synthetic datasets with voxseg's generator: training + test set (a) at 1.5 x 1 x 1 mm
     (nnU-Net raw layout, Dataset777_Synth), and test set (b) at 1.2 x 0.85 x 0.9 mm (another spacing: both
     tools resample to the training spacing and back);
  2. nnU-Net (in its own interpreter, benchmarks/.venv-nnunet; create it with --setup-nnunet): fingerprint,
     plan and preprocess 3d_fullres through its Python API, the plans' 3d_fullres patch and network made small
     (32^3 patch, 4 stages of 8..64 features) so that a CPU trains it in a few minutes, then a short training of
     fold 0 with a subclass of nnUNetTrainer (--epochs x --iterations) -> nnUNet_results/.../
     nnUNetTrainerTiny__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth;
  3. prediction of each test folder with and without mirroring by nnU-Net's nnUNetPredictor.predict_from_files
     (tile step 0.5, Gaussian, device cpu, probabilities saved) and by `voxseg predict -m MODEL` (the same
     settings, --save-probabilities), both on --threads torch threads; each run is timed as a whole process
     (start-up, model loading, reading, prediction, writing), the tools alternating;
  4. per case: voxel agreement of the label maps, geometry (shape and affine) of both outputs, max |p_voxseg -
     p_nnU-Net| of the saved probabilities (voxseg stores float16, nnU-Net float32; both (K, D, H, W) in array
     axis order), Dice of each tool against the reference labels; per folder: wall time and voxseg/nnU-Net.

nnU-Net accumulates the tile logits in float16 (its Gaussian weights too); --nnunet-fp32 runs its predictor
with float32 accumulators instead (a diagnostic: what is left of the probability difference is then voxseg's).

Run: python benchmarks/nnunet_predict_compare.py [--setup-nnunet] [--nnunet-python PY] [--work DIR]
         [--threads 2] [--epochs 6] [--iterations 25] [--repeats 1] [--sets a,b] [--mirror-modes on,off]
         [--nnunet-fp32] [--voxseg-args '--amp bf16'] [--json benchmarks/results/nnunet_predict_compare.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's voxseg, not an installed one
DATASET = "Dataset777_Synth"
TRAINER = "nnUNetTrainerTiny"
TRAIN_SHAPE, TRAIN_SPACING = (40, 64, 64), (1.5, 1.0, 1.0)
OTHER_SHAPE, OTHER_SPACING = (50, 75, 71), (1.2, 0.85, 0.9)  # about the same extent in mm
PATCH = [32, 32, 32]
FEATURES = [8, 16, 32, 64]


# ----- nnU-Net's side: runs in the nnU-Net interpreter --------------------------------------------------------
def _nnunet_env(work: Path) -> None:
    """nnU-Net reads its folders from the environment when it is imported."""
    for name in ("raw", "preprocessed", "results"):
        os.environ[f"nnUNet_{name}"] = str(work / f"nnUNet_{name}")
    os.environ.setdefault("nnUNet_compile", "f")


def _trainer_class(epochs: int, iterations: int):
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerTiny(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming; the class name is the folder name)
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")):  # nnU-Net records these names in checkpoints
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = epochs, iterations, 2
            self.save_every = 10 ** 6

    return nnUNetTrainerTiny


def _small_network(plans_file: Path) -> None:
    """3d_fullres with a 32^3 patch and a 4-stage PlainConvUNet of 8..64 features (fast on a CPU)."""
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"]["3d_fullres"]
    config["patch_size"], config["batch_size"] = PATCH, 2
    kwargs = config["architecture"]["arch_kwargs"]
    kwargs.update(n_stages=4, features_per_stage=FEATURES, kernel_sizes=[[3, 3, 3]] * 4,
                  strides=[[1, 1, 1]] + [[2, 2, 2]] * 3, n_conv_per_stage=[2] * 4, n_conv_per_stage_decoder=[2] * 3)
    plans_file.write_text(json.dumps(plans, indent=2))


def nnunet_train(args: argparse.Namespace) -> None:
    import torch

    work = Path(args.work)
    _nnunet_env(work)
    torch.set_num_threads(args.threads)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    dataset_id = int(DATASET[7:10])
    preprocessed = work / "nnUNet_preprocessed" / maybe_convert_to_dataset_name(dataset_id)
    if not (preprocessed / "nnUNetPlans_3d_fullres").is_dir():
        extract_fingerprints([dataset_id], num_processes=args.threads, check_dataset_integrity=True)
        plan_experiments([dataset_id])
        _small_network(preprocessed / "nnUNetPlans.json")
        preprocess([dataset_id], configurations=("3d_fullres",), num_processes=(args.threads,))
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    plans["continue_training"] = False  # nnU-Net's run_training puts this flag into the plans for the trainer
    os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in the main process (read when training starts)
    trainer = _trainer_class(args.epochs, args.iterations)(plans, "3d_fullres", 0, dataset_json,
                                                           device=torch.device("cpu"))
    trainer.run_training()


class _TorchFloat32(types.ModuleType):
    """torch, except that torch.half is float32 (nnU-Net's predictor allocates its accumulators as torch.half)."""

    def __getattr__(self, name: str):
        import torch

        return torch.float32 if name == "half" else getattr(torch, name)


def nnunet_predict(args: argparse.Namespace) -> None:
    import torch

    _nnunet_env(Path(args.work))
    torch.set_num_threads(args.threads)
    import nnunetv2.inference.predict_from_raw_data as raw
    # the predictor looks the trainer up by name among every nnU-Net trainer module (which imports timm and
    # torchvision); the model's trainer is ours
    raw.recursive_find_trainer_class_by_name = lambda name: _trainer_class(1, 1)
    if args.nnunet_fp32:  # diagnostic: nnU-Net's accumulators and Gaussian (float16 in nnU-Net) in float32
        raw.torch = _TorchFloat32("torch")
        gaussian = functools.partial(raw.compute_gaussian, dtype=torch.float32)
        gaussian.cache_clear = raw.compute_gaussian.cache_clear  # the predictor clears the cache after each run
        raw.compute_gaussian = gaussian
    predictor = raw.nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=args.mirror,
                                    perform_everything_on_device=True, device=torch.device("cpu"), verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(args.model, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    predictor.predict_from_files(args.input, args.output, save_probabilities=not args.no_probabilities, overwrite=True,
                                 num_processes_preprocessing=args.threads,
                                 num_processes_segmentation_export=args.threads)


# ----- voxseg's side ------------------------------------------------------------------------------------------
def make_data(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    from voxseg.data.synth import make_synthetic_dataset

    raw = make_synthetic_dataset(work / "nnUNet_raw" / DATASET, num_cases=args.train_cases, num_test=args.test_cases,
                                 shape=TRAIN_SHAPE, spacing=TRAIN_SPACING, seed=0)
    other = make_synthetic_dataset(work / "other_spacing", num_cases=1, num_test=args.test_cases, shape=OTHER_SHAPE,
                                   spacing=OTHER_SPACING, seed=1)
    return {"a": raw, "b": other}


def _run(command: list[str], threads: int, voxseg: bool, cwd: Path | None = None) -> float:
    """Wall time of one process (this checkout's voxseg on its path when `voxseg`); its output is shown only
    when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = str(HERE.parent) if voxseg else ""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return seconds


def _nnunet_command(args: argparse.Namespace, *extra: str) -> list[str]:
    return [args.nnunet_python, __file__, "--work", str(args.work), "--threads", str(args.threads), *extra]


def _dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float | None:
    a, b = pred == label, ref == label
    total = int(a.sum() + b.sum())
    return None if total == 0 else 2.0 * float((a & b).sum()) / total


def compare_case(name: str, ours: Path, theirs: Path, reference: Path, labels: list[int]) -> dict:
    from voxseg.data.io import read_image

    seg_v, geo_v = read_image(ours / f"{name}.nii.gz")
    seg_n, geo_n = read_image(theirs / f"{name}.nii.gz")
    ref, _ = read_image(reference / f"{name}.nii.gz")
    p_v = np.load(ours / f"{name}.npz")["probabilities"].astype(np.float32)
    p_n = np.load(theirs / f"{name}.npz")["probabilities"].astype(np.float32)
    result = {"case": name, "shape": list(seg_v.shape), "same_shape": seg_v.shape == seg_n.shape == ref.shape,
              "affine_max_diff": float(np.abs(geo_v.affine - geo_n.affine).max()),
              "probability_shapes": [list(p_v.shape), list(p_n.shape)]}
    if not result["same_shape"] or p_v.shape != p_n.shape:
        return {**result, "agreement": 0.0, "prob_max_abs_diff": float("inf")}
    diff = np.abs(p_v - p_n)
    result.update(agreement=float((seg_v == seg_n).mean()), differing_voxels=int((seg_v != seg_n).sum()),
                  prob_max_abs_diff=float(diff.max()), prob_mean_abs_diff=float(diff.mean()),
                  foreground_voxels=[int((seg_v > 0).sum()), int((seg_n > 0).sum())],
                  dice_voxseg={str(label): _dice(seg_v, ref, label) for label in labels},
                  dice_nnunet={str(label): _dice(seg_n, ref, label) for label in labels})
    return result


def _mean_dice(cases: list[dict], key: str) -> float:
    values = [d for c in cases for d in c[key].values() if d is not None]
    return float(np.mean(values)) if values else float("nan")


def compare(args: argparse.Namespace) -> dict:
    import torch

    work = Path(args.work)
    sets = make_data(work, args) if not (work / "nnUNet_raw" / DATASET).is_dir() else {
        "a": work / "nnUNet_raw" / DATASET, "b": work / "other_spacing"}
    model = work / "nnUNet_results" / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        start = time.perf_counter()
        _run(_nnunet_command(args, "--nnunet-train", "--epochs", str(args.epochs), "--iterations",
                             str(args.iterations)), args.threads, voxseg=False)
        print(f"nnU-Net fingerprint/plan/preprocess/training: {time.perf_counter() - start:.0f} s")
    labels = [int(v) for k, v in json.loads((sets["a"] / "dataset.json").read_text())["labels"].items()
              if k != "background"]
    report = {"threads": args.threads, "nnunet_fp32_accumulators": args.nnunet_fp32, "torch": torch.__version__,
              "model": str(model.name), "patch": PATCH,
              "features": FEATURES, "train_spacing": TRAIN_SPACING, "other_spacing": OTHER_SPACING, "runs": []}
    for mirror in [m == "on" for m in args.mirror_modes.split(",")]:
        for key, folder in [(k, sets[k]) for k in args.sets.split(",")]:
            images, tag = folder / "imagesTs", f"{key}_{'mirror' if mirror else 'nomirror'}"
            out_v, out_n = work / "pred" / f"voxseg_{tag}", work / "pred" / f"nnunet_{tag}"
            times = {"voxseg": [], "nnunet": []}
            for repeat in range(args.repeats):
                order = ("voxseg", "nnunet") if repeat % 2 == 0 else ("nnunet", "voxseg")
                for tool in order:
                    if tool == "voxseg":
                        command = [sys.executable, "-m", "voxseg", "predict", "-m", str(model), "-i", str(images),
                                   "-o", str(out_v), "--step", "0.5", "--device", "cpu", "--save-probabilities",
                                   *(() if mirror else ("--no-mirror",)), *args.voxseg_args.split()]
                    else:
                        command = _nnunet_command(args, "--nnunet-predict", "--model", str(model), "--input",
                                                  str(images), "--output", str(out_n),
                                                  *(("--mirror",) if mirror else ()),
                                                  *(("--nnunet-fp32",) if args.nnunet_fp32 else ()))
                    times[tool].append(_run(command, args.threads, voxseg=tool == "voxseg"))
            names = sorted(p.name[: -len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz"))
            cases = [compare_case(n, out_v, out_n, folder / "labelsTs", labels) for n in names]
            run = {"set": key, "spacing": TRAIN_SPACING if key == "a" else OTHER_SPACING, "mirror": mirror,
                   "cases": cases, "seconds_voxseg": times["voxseg"], "seconds_nnunet": times["nnunet"],
                   "ratio": float(np.median(times["voxseg"]) / np.median(times["nnunet"])),
                   "min_agreement": min(c["agreement"] for c in cases),
                   "max_prob_diff": max(c["prob_max_abs_diff"] for c in cases),
                   "mean_dice_voxseg": _mean_dice(cases, "dice_voxseg"),
                   "mean_dice_nnunet": _mean_dice(cases, "dice_nnunet"),
                   "geometry_identical": all(c["same_shape"] and c["affine_max_diff"] < 1e-5 for c in cases)}
            report["runs"].append(run)
            print_run(run)
    return report


def print_run(run: dict) -> None:
    head = (f"set ({run['set']}) spacing {tuple(run['spacing'])}, mirroring {'on' if run['mirror'] else 'off'}: "
            f"voxseg {np.median(run['seconds_voxseg']):.1f} s, nnU-Net {np.median(run['seconds_nnunet']):.1f} s, "
            f"ratio {run['ratio']:.2f}; geometry identical: {run['geometry_identical']}")
    print(head)
    print(f"  {'case':10s} {'agreement':>10s} {'differ':>7s} {'max|dp|':>9s} {'Dice voxseg':>12s} "
          f"{'Dice nnU-Net':>13s}")
    for c in run["cases"]:
        dv, dn = (np.mean([d for d in c[k].values() if d is not None]) for k in ("dice_voxseg", "dice_nnunet"))
        print(f"  {c['case']:10s} {100 * c['agreement']:9.4f}% {c['differing_voxels']:7d} "
              f"{c['prob_max_abs_diff']:9.2e} {dv:12.4f} {dn:13.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    parser.add_argument("--nnunet-python", default=str(HERE / ".venv-nnunet" / "bin" / "python"))
    parser.add_argument("--setup-nnunet", action="store_true", help="create benchmarks/.venv-nnunet first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--train-cases", type=int, default=10)
    parser.add_argument("--test-cases", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--sets", default="a,b", help="test sets: a (training spacing), b (other spacing)")
    parser.add_argument("--mirror-modes", default="on,off", help="on, off or on,off")
    parser.add_argument("--nnunet-fp32", action="store_true",
                        help="diagnostic: run nnU-Net's sliding window with float32 instead of float16 accumulators")
    parser.add_argument("--voxseg-args", default="", help="more options for voxseg predict, e.g. '--amp bf16'")
    parser.add_argument("--json", default=str(HERE / "results" / "nnunet_predict_compare.json"))
    for hidden in ("--nnunet-train", "--nnunet-predict", "--mirror"):
        parser.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-probabilities", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--model", "--input", "--output"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nnunet_train:
        return nnunet_train(args)
    if args.nnunet_predict:
        return nnunet_predict(args)
    if args.setup_nnunet:
        from augment_bench import setup_nnunet

        setup_nnunet()
        args.nnunet_python = str(HERE / ".venv-nnunet" / "bin" / "python")
    with tempfile.TemporaryDirectory() as tmp:
        args.work = str(Path(args.work).resolve()) if args.work else tmp
        report = compare(args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
