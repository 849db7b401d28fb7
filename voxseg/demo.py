"""`voxseg demo`: the whole pipeline on the built-in synthetic dataset.

synth -> check + plan -> preprocess -> train (fold 0) -> predict the held-out test cases -> evaluate.
On a CPU the demo shrinks the network so it trains in minutes; on a GPU it uses the plan as planned.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from voxseg.devices import resolve_device
from voxseg.plans import Plan
from voxseg.workdir import WorkDir


@dataclass
class DemoSize:
    """How big the demo is: cases, their shape and the training length."""

    train_cases: int
    test_cases: int
    shape: tuple[int, int, int]
    epochs: int
    iterations: int
    max_features: int


CPU_DEMO = DemoSize(train_cases=16, test_cases=4, shape=(48, 48, 48), epochs=12, iterations=20, max_features=64)
QUICK_DEMO = DemoSize(train_cases=6, test_cases=2, shape=(32, 32, 32), epochs=2, iterations=4, max_features=32)
GPU_DEMO = DemoSize(train_cases=40, test_cases=10, shape=(96, 96, 96), epochs=50, iterations=100, max_features=320)


def shrink_plan_for_cpu(plan: Plan, max_features: int, patch: int) -> Plan:
    """Cap the feature maps and the patch so a CPU trains the demo in minutes (the topology stays the planner's)."""
    plan.network.features = [min(f // 2, max_features) for f in plan.network.features]
    plan.patch_size = [min(p, patch) for p in plan.patch_size]
    plan.patch_size = [max(t, (p // t) * t) for p, t in zip(plan.patch_size, plan.network.total_stride)]
    plan.batch_size = 2
    return Plan.from_dict(plan.to_dict())  # re-validate


def run_demo(workdir: str | Path, epochs: int | None = None, device: str = "auto", quick: bool = False) -> dict:
    """Run the full pipeline and return the evaluation summary."""
    from voxseg.config import TrainConfig, apply_overrides
    from voxseg.data.plan import describe_plan, plan_dataset
    from voxseg.data.preprocess import preprocess_dataset
    from voxseg.data.synth import make_synthetic_dataset
    from voxseg.infer.predictor import Predictor, find_input_cases
    from voxseg.train.loop import train
    from voxseg.train.start import RunStart

    # a device that does not exist fails now, not after minutes of data preparation
    device = str(resolve_device(device))
    size = QUICK_DEMO if quick else (GPU_DEMO if device.startswith("cuda") else CPU_DEMO)
    workdir = Path(workdir)
    dataset = workdir / "Dataset001_Synth"
    model_dir = workdir / "model"
    start = time.perf_counter()

    print(f"[1/6] synthetic dataset: {size.train_cases} training + {size.test_cases} test cases of {size.shape} "
          f"-> {dataset}")
    if not (dataset / "dataset.json").is_file():
        make_synthetic_dataset(dataset, num_cases=size.train_cases, num_test=size.test_cases, shape=size.shape, seed=0)

    print("[2/6] check + fingerprint + plan")
    plan = plan_dataset(dataset, model_dir, gpu_memory_gb=8.0, val_fraction=0.25)
    if device == "cpu":
        plan = shrink_plan_for_cpu(plan, size.max_features, patch=32)
        plan.save(WorkDir(model_dir).plans)
    print(describe_plan(plan))

    print("[3/6] preprocess")
    stats = preprocess_dataset(model_dir, num_workers=2, progress=False)
    print(f"      {stats['done']} cases in {stats['seconds']:.1f} s")

    print(f"[4/6] train fold 0 on {device}")
    overrides = [
        f"loop.epochs={epochs or size.epochs}", f"data.iterations_per_epoch={size.iterations}",
        f"loop.device={device}", "loop.val_iterations=4",
    ]
    if device == "cpu":
        overrides += ["optim.name=adamw", "optim.lr=3e-3", "optim.weight_decay=1e-4", "logging.tensorboard=false"]
    config = apply_overrides(TrainConfig(), overrides)
    result = train(model_dir, 0, config, RunStart(force=True))  # a demo run again starts its training over
    print(f"      validation Dice {result.get('val_dice_mean', float('nan')):.3f}")

    print("[5/6] predict held-out test cases")
    predictor = Predictor.from_workdir(model_dir, folds=[0], device=device)
    cases = find_input_cases([str(dataset / "imagesTs")], plan.num_channels, plan.file_ending)
    predictor.predict_files(cases, workdir / "predictions")

    print("[6/6] evaluate and report")
    summary = _evaluate_and_report(workdir, dataset, model_dir)
    print(f"demo finished in {time.perf_counter() - start:.0f} s; outputs in {workdir}")
    print(f"report: {workdir / 'report.html'} (open it in a browser: metrics, plots, overlays of each test case, "
          "training curves)")
    return summary


def _evaluate_and_report(workdir: Path, dataset: Path, model_dir: Path) -> dict:
    """Score the test predictions, print the table, and write WORKDIR/report.html."""
    from voxseg.evaluate.folder import evaluate_folder, format_table
    from voxseg.report.build import ReportSources, write_report

    summary = evaluate_folder(workdir / "predictions", dataset / "labelsTs", dataset_json=dataset / "dataset.json")
    print(format_table(summary))
    write_report(ReportSources(workdir / "predictions", dataset / "labelsTs", summary=summary,
                               training=[WorkDir(model_dir).fold(0)], title="voxseg demo report"),
                 workdir / "report.html")
    return summary
