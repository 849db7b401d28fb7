"""voxseg predict against nnU-Net 2.8.1's predictor at BraTS size, on the same model folder, on this CPU.

Steps (everything under --work):
  1. a synthetic BraTS-sized set with voxseg's generator: 4 channels, 155 x 240 x 240 at 1 mm, --cases training
     cases and --test-cases test cases; `voxseg plan` (the 6-stage 32..320 network, patch 96 x 128 x 160 on this
     data) and `voxseg preprocess`; one training iteration of fold 0 (the weights are nearly the initial ones:
     the speed is the network's, not the training's); `voxseg export --format nnunet` -> an nnU-Net model folder;
  2. the test cases predicted from that folder, fold 0, tile step 0.5, by
       voxseg predict                 (the defaults: float32, the CPU forward variant measured and cached)
       voxseg predict --amp bf16      (bfloat16 convolutions)
       nnU-Net's nnUNetPredictor      (predict_from_files, device cpu, --threads processes for reading/writing,
                                       in benchmarks/.venv-nnunet: create it with --setup-nnunet)
     each as a whole process (start-up, loading, reading, preprocessing, prediction, writing), with and without
     mirroring (--mirror-modes), the tools alternating over --repeats rounds; no probabilities written;
  3. the voxel agreement of each voxseg label map with nnU-Net's.
  4. with --stages: each tool's time per stage for one case without mirroring (load, read, preprocess, sliding
     window, restore to the input grid, write), the tools' own functions called one after the other (voxseg in
     this process, nnU-Net in its interpreter).

The first voxseg run of a model on a machine includes the measurement of the CPU forward variants (a few forward
passes; kept in ~/.cache/voxseg/cpu_forward.json); --warm measures it before the timed runs.

Run: python benchmarks/predict_speed.py [--setup-nnunet] [--work DIR] [--test-cases 2] [--threads 2]
         [--mirror-modes off,on] [--subset N] [--repeats 1] [--tools voxseg,voxseg-bf16,nnunet] [--warm] [--stages]
         [--json benchmarks/results/predict_speed.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
SHAPE = "155,240,240"
TOOLS = {"voxseg": (), "voxseg-bf16": ("--amp", "bf16")}


def _run(command: list[str], threads: int, cwd: Path | None = None, voxseg: bool = True) -> float:
    from nnunet_predict_compare import _run as run

    return run(command, threads, voxseg, cwd)


class Stopwatch(dict):
    """Seconds per named step: `watch("read", fn, *args)` runs fn(*args), keeps its time and returns its result."""

    def __call__(self, name, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self[name] = round(time.perf_counter() - start, 2)
        return result


def build(work: Path, args: argparse.Namespace) -> Path:
    """The data, the trained fold 0 and its nnU-Net export; returns the nnU-Net model folder."""
    voxseg = [sys.executable, "-m", "voxseg"]
    model = work / "nnunet_model"
    if model.is_dir():
        return model
    steps = [
        ["synth", "raw", "--cases", str(args.cases), "--test-cases", str(args.test_cases), "--shape", SHAPE],
        ["plan", "raw", "-o", "work", "--val-fraction", "0.5"],
        ["preprocess", "work"],
        ["train", "work", "--fold", "0", "--device", "cpu", "--epochs", "1", "--iterations", "1",
         "--set", "loop.val_iterations=1", "--set", "loop.full_val=false"],
        ["export", "work", "--folds", "0", "--format", "nnunet", str(model)],
    ]
    for step in steps:
        seconds = _run(voxseg + step, args.threads, cwd=work)
        print(f"voxseg {step[0]}: {seconds:.1f} s", flush=True)
    return model


def _folder(model: Path) -> Path:
    """The <Trainer>__<Plans>__<configuration> folder inside an export."""
    if (model / "fold_0").is_dir():
        return model
    return next(p for p in model.rglob("fold_0")).parent


def predict(tool: str, model: Path, images: Path, out: Path, mirror: bool, args: argparse.Namespace) -> float:
    if tool == "nnunet":
        command = [args.nnunet_python, str(HERE / "nnunet_predict_compare.py"), "--nnunet-predict", "--work",
                   str(args.work), "--threads", str(args.threads), "--model", str(model), "--input", str(images),
                   "--output", str(out), "--no-probabilities", *(("--mirror",) if mirror else ())]
        return _run(command, args.threads, voxseg=False)
    command = [sys.executable, "-m", "voxseg", "predict", "-m", str(model), "-i", str(images), "-o", str(out),
               "--folds", "0", "--step", "0.5", "--device", "cpu", *(() if mirror else ("--no-mirror",)),
               *TOOLS[tool]]
    return _run(command, args.threads)


def agreement(ours: Path, theirs: Path) -> list[float]:
    from voxseg.data.io import read_image

    values = []
    for path in sorted(theirs.glob("*.nii.gz")):
        a, _ = read_image(ours / path.name)
        b, _ = read_image(path)
        values.append(float((a == b).mean()) if a.shape == b.shape else 0.0)
    return values


def stages(model: Path, images: Path, args: argparse.Namespace, amp: str,
           cpu_forward: str = "auto") -> dict[str, float]:
    """Seconds per stage of one case, voxseg's own functions called one after the other."""
    import tempfile

    import torch

    from voxseg.data.io import write_image
    from voxseg.infer.config import InferConfig
    from voxseg.infer.inputs import find_input_cases
    from voxseg.infer.postprocess import labels_on_original_grid
    from voxseg.infer.predictor import Predictor

    torch.set_num_threads(args.threads)
    times = timed = Stopwatch()

    predictor = timed("load", Predictor.from_workdir, model,
                      InferConfig(folds=[0], device="cpu", mirror_axes="none", amp=amp, cpu_forward=cpu_forward))
    name, files = find_input_cases(images, 4, ".nii.gz")[0]
    image, geometry = timed("read", predictor._read_case, name, files)
    image_pp, properties = timed("preprocess", predictor.preprocess, image.astype(np.float32), geometry, name)
    logits = timed("sliding window", predictor.predict_logits, image_pp, name)
    labels, _ = timed("restore", labels_on_original_grid, logits, predictor.plan, properties)
    with tempfile.TemporaryDirectory() as tmp:
        timed("write", write_image, Path(tmp) / f"{name}.nii.gz", labels, geometry)
    times["network grid"] = list(image_pp.shape)
    return times


def nnunet_stages(args: argparse.Namespace) -> None:
    """Runs inside benchmarks/.venv-nnunet: nnU-Net's predictor's stages for one case, one after the other,
    printed as JSON (read, preprocess, sliding window, restore to the input grid, write)."""
    import tempfile

    import nnunet_predict_compare as compare
    import nnunetv2.inference.predict_from_raw_data as raw
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    compare._nnunet_env(Path(args.work))
    torch.set_num_threads(args.threads)
    raw.recursive_find_trainer_class_by_name = lambda name: compare._trainer_class(1, 1)
    times = timed = Stopwatch()

    predictor = raw.nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=True, device=torch.device("cpu"), verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=False)
    timed("load", predictor.initialize_from_trained_model_folder, args.model, use_folds=(0,),
          checkpoint_name="checkpoint_final.pth")
    files = sorted(str(p) for p in Path(args.input).glob(f"{args.case}_*.nii.gz"))
    reader = predictor.plans_manager.image_reader_writer_class()
    images, properties = timed("read", reader.read_images, files)
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, properties = timed("preprocess", preprocessor.run_case_npy, images, None, properties,
                                predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json)
    logits = timed("sliding window", predictor.predict_logits_from_preprocessed_data, torch.from_numpy(data))
    seg = timed("restore", convert_predicted_logits_to_segmentation_with_correct_shape, logits.cpu(),
                predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, properties,
                False)
    with tempfile.TemporaryDirectory() as tmp:
        timed("write", reader.write_seg, seg, str(Path(tmp) / f"{args.case}.nii.gz"), properties)
    times["network grid"] = list(data.shape)
    print(json.dumps(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/voxseg_predict_speed")
    parser.add_argument("--nnunet-python", default=str(HERE / ".venv-nnunet" / "bin" / "python"))
    parser.add_argument("--setup-nnunet", action="store_true")
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--test-cases", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mirror-modes", default="off,on")
    parser.add_argument("--subset", type=int, default=0, help="predict only the first N test cases")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tools", default="voxseg,voxseg-bf16,nnunet")
    parser.add_argument("--warm", action="store_true", help="measure voxseg's CPU forward variants first")
    parser.add_argument("--stages", action="store_true", help="also time voxseg's stages on one case")
    parser.add_argument("--json", default=str(HERE / "results" / "predict_speed.json"))
    parser.add_argument("--nnunet-stages", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--model", "--input", "--case"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nnunet_stages:
        return nnunet_stages(args)
    if args.setup_nnunet:
        from augment_bench import setup_nnunet

        setup_nnunet()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    model = _folder(build(work, args))
    images = work / "raw" / "imagesTs"
    if args.subset:  # the first N test cases only (links in a folder of their own)
        subset = work / "raw" / f"imagesTs_first{args.subset}"
        if not subset.is_dir():
            subset.mkdir()
            names = sorted({p.name[: -len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz")})[: args.subset]
            for path in sorted(images.glob("*.nii.gz")):
                if any(path.name.startswith(f"{name}_") for name in names):
                    (subset / path.name).symlink_to(path)
        images = subset
    tools = args.tools.split(",")
    report = {"threads": args.threads, "shape": SHAPE, "model": str(model), "runs": [], "stages": {}}
    if args.warm:
        for tool in [t for t in tools if t != "nnunet"]:
            predict(tool, model, images, work / "pred" / "warm", False, args)
    for mirror in [m == "on" for m in args.mirror_modes.split(",")]:
        seconds: dict[str, list[float]] = {tool: [] for tool in tools}
        for repeat in range(args.repeats):
            for tool in tools if repeat % 2 == 0 else tools[::-1]:
                out = work / "pred" / f"{tool}_{'mirror' if mirror else 'nomirror'}{args.subset or ''}"
                seconds[tool].append(predict(tool, model, images, out, mirror, args))
                print(f"mirror {'on' if mirror else 'off'} {tool}: {seconds[tool][-1]:.1f} s", flush=True)
        run = {"mirror": mirror, "seconds": seconds}
        if "nnunet" in tools:
            theirs = work / "pred" / f"nnunet_{'mirror' if mirror else 'nomirror'}{args.subset or ''}"
            base = float(np.median(seconds["nnunet"]))
            for tool in [t for t in tools if t != "nnunet"]:
                ours = work / "pred" / f"{tool}_{'mirror' if mirror else 'nomirror'}{args.subset or ''}"
                run[f"{tool}/nnunet"] = round(float(np.median(seconds[tool])) / base, 3)
                run[f"{tool} agreement"] = agreement(ours, theirs)
                print(f"  {tool}/nnU-Net {run[f'{tool}/nnunet']:.2f}, label agreement "
                      f"{', '.join(f'{100 * a:.4f} %' for a in run[f'{tool} agreement'])}", flush=True)
        report["runs"].append(run)
    if args.stages:
        for tool, amp, variant in (("voxseg", "auto", "auto"), ("voxseg-bf16", "bf16", "auto"),
                                   ("voxseg --cpu-forward fp32", "auto", "fp32")):
            report["stages"][tool] = stages(model, images, args, amp, variant)
            print(f"stages {tool}: {report['stages'][tool]}", flush=True)
        case = sorted(p.name[: -len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz"))[0]
        done = subprocess.run([args.nnunet_python, __file__, "--nnunet-stages", "--work", args.work, "--threads",
                               str(args.threads), "--model", str(model), "--input", str(images), "--case", case],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        if done.returncode:
            sys.exit(f"nnU-Net stages failed:\n{done.stderr[-4000:]}")
        report["stages"]["nnunet"] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"stages nnunet: {report['stages']['nnunet']}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
