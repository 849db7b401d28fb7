"""voxseg evaluate's conventions checked against the installed tools: MONAI's metrics and nnU-Net's evaluation.

A fixture set of synthetic 3D label pairs (anisotropic spacing; empty prediction, reference or both for a class;
empty images; one- and two-voxel structures; structures on the image border; regions) is evaluated by
`voxseg.evaluate.evaluate_folder` under every convention and, on the same arrays, by

    MONAI      DiceMetric / MeanIoU (include_background=False, ignore_empty True and False),
               HausdorffDistanceMetric(percentile=95, directed=False), SurfaceDiceMetric(class_thresholds=[tol],
               use_subvoxels=False), all with the voxel spacing; run in benchmarks/.venv-monai;
    nnU-Net    nnunetv2.evaluation.evaluate_predictions.compute_metrics (Dice, IoU) on the same files; run in
               benchmarks/.venv-nnunet (create it with benchmarks/augment_bench.py --setup-nnunet, or point
               --nnunet-python at another interpreter with nnunetv2 2.8.1).

Each tool runs in its own interpreter and prints JSON; this script compares per case and class and prints a
markdown table: values compared, cases where one side is undefined (NaN/inf) and the other is not, and the
largest difference where both are defined.

Usage:
    python benchmarks/evaluate_conventions.py --setup      # create benchmarks/.venv-monai (torch, monai, scipy)
    python benchmarks/evaluate_conventions.py [--tolerance 1.0] [--nnunet-python PATH] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MONAI_VENV = HERE / ".venv-monai"
NNUNET_VENV = HERE / ".venv-nnunet"
MONAI_VERSION = "1.6.1"
SPACING = (2.5, 0.8, 1.1)  # array axis order (D, H, W), mm
SHAPE = (14, 30, 26)
LABELS = {"background": 0, "edema": 1, "core": 2, "enhancing": 3}
REGIONS = {"whole": [1, 2, 3], "tumor_core": [2, 3]}
CLASSES = {"edema": [1], "core": [2], "enhancing": [3], **REGIONS}
ENDING = ".nii.gz"


def _ellipsoid(centre, radii_mm) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")).astype(float)
    offsets = [(grid[a] - centre[a]) * SPACING[a] / radii_mm[a] for a in range(3)]
    return sum(o ** 2 for o in offsets) <= 1.0


def _tumour(centre=(7, 15, 13), scale=1.0, enhancing=True) -> np.ndarray:
    seg = np.zeros(SHAPE, np.uint8)
    seg[_ellipsoid(centre, (12 * scale, 9 * scale, 10 * scale))] = 1
    seg[_ellipsoid(centre, (7 * scale, 5 * scale, 6 * scale))] = 2
    if enhancing:
        seg[_ellipsoid(centre, (4 * scale, 3 * scale, 3 * scale))] = 3
    return seg


def fixtures() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (prediction, reference) label maps."""
    rng = np.random.default_rng(11)
    ref = _tumour()
    cases = {"shifted": (np.roll(ref, (1, 2, -1), axis=(0, 1, 2)), ref)}
    noisy = ref.copy()
    noisy[(rng.random(SHAPE) < 0.12) & (ref > 0)] = 0
    noisy[0:2, 0:3, 20:26] = 1  # a false positive on the image border
    noisy[12:14, 25:28, 0:2] = 3
    cases["noisy_border"] = (noisy, ref)
    no_enh = np.where(ref == 3, 2, ref).astype(np.uint8)
    cases["pred_empty_enh"] = (no_enh, ref)
    small_enh = no_enh.copy()
    small_enh[7, 15:17, 13] = 3
    cases["ref_empty_enh"] = (small_enh, no_enh)
    cases["both_empty_enh"] = (np.roll(no_enh, 1, axis=2), no_enh)
    tiny_ref, tiny_pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    tiny_ref[5, 10, 10], tiny_pred[5, 11, 10] = 3, 3  # one voxel each, one voxel apart
    tiny_ref[9, 20:22, 5], tiny_pred[9, 20:22, 5] = 2, 2  # two voxels, identical
    tiny_ref[0, 0, 0], tiny_pred[0, 1, 1] = 1, 1  # one voxel in the corner
    cases["tiny"] = (tiny_pred, tiny_ref)
    empty = np.zeros(SHAPE, np.uint8)
    cases["all_empty"] = (empty, empty)
    cases["pred_all_empty"] = (empty, _tumour(scale=0.7))
    cases["ref_all_empty"] = (_tumour(centre=(6, 12, 12), scale=0.8), empty)
    big = _tumour(scale=1.6)  # cut by the image border on every side
    cases["border_cut"] = (np.roll(big, 2, axis=1), big)
    return cases


def write_fixtures(folder: Path) -> tuple[Path, Path, Path]:
    from voxseg.data.io import Geometry, write_image

    pred_dir, ref_dir = folder / "pred", folder / "ref"
    geometry = Geometry.from_spacing(SPACING)
    arrays = {}
    for name, (pred, ref) in fixtures().items():
        write_image(pred_dir / f"{name}{ENDING}", pred, geometry)
        write_image(ref_dir / f"{name}{ENDING}", ref, geometry)
        arrays[f"{name}/pred"], arrays[f"{name}/ref"] = pred, ref
    np.savez(folder / "arrays.npz", **arrays)
    dataset = {"channel_names": {"0": "MR"}, "labels": LABELS, "file_ending": ENDING}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return pred_dir, ref_dir, folder / "dataset.json"


# ---------------------------------------------------------------- the tools, each in its own interpreter


def monai_worker(folder: Path, tolerance: float) -> dict:
    """Runs in benchmarks/.venv-monai: MONAI's metrics per case and class."""
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU, SurfaceDiceMetric

    arrays = np.load(folder / "arrays.npz")
    cases = sorted({key.split("/")[0] for key in arrays.files})
    metrics = {
        "dice_ignore_empty": DiceMetric(include_background=False, reduction="none", ignore_empty=True),
        "dice": DiceMetric(include_background=False, reduction="none", ignore_empty=False),
        "iou_ignore_empty": MeanIoU(include_background=False, reduction="none", ignore_empty=True),
        "iou": MeanIoU(include_background=False, reduction="none", ignore_empty=False),
    }
    hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, directed=False, reduction="none")
    nsd = SurfaceDiceMetric(class_thresholds=[tolerance], include_background=False, use_subvoxels=False,
                            reduction="none")
    out: dict = {}
    for case in cases:
        out[case] = {}
        for name, values in CLASSES.items():
            def onehot(labels):
                mask = torch.as_tensor(np.isin(labels, values))
                return torch.stack([~mask, mask]).unsqueeze(0).float()  # (1, 2, *S): background, class
            y_pred, y = onehot(arrays[f"{case}/pred"]), onehot(arrays[f"{case}/ref"])
            row = {key: float(metric(y_pred, y)[0, 0]) for key, metric in metrics.items()}
            row["hd95"] = float(hd95(y_pred, y, spacing=list(SPACING))[0, 0])
            row["nsd"] = float(nsd(y_pred, y, spacing=list(SPACING))[0, 0])
            out[case][name] = row
    return out


def nnunet_worker(folder: Path) -> dict:
    """Runs in benchmarks/.venv-nnunet: nnU-Net's compute_metrics per case on the same files."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    keys = {name: (values[0] if len(values) == 1 else tuple(values)) for name, values in CLASSES.items()}
    out: dict = {}
    for ref in sorted((folder / "ref").glob(f"*{ENDING}")):
        case = ref.name[: -len(ENDING)]
        result = compute_metrics(str(ref), str(folder / "pred" / ref.name), SimpleITKIO(), list(keys.values()))
        out[case] = {name: {"dice": float(result["metrics"][key]["Dice"]), "iou": float(result["metrics"][key]["IoU"])}
                     for name, key in keys.items()}
    return out


def _run_worker(python: Path, which: str, folder: Path, tolerance: float) -> dict | str:
    if not python.exists():
        return f"{python} not found" + (" (run with --setup)" if which == "monai" else "")
    command = [str(python), __file__, f"--{which}-worker", str(folder), "--tolerance", str(tolerance)]
    # the tools' interpreters must not see this checkout's voxseg (nor its numpy)
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    if done.returncode:
        return f"{which} run failed: {done.stderr.strip().splitlines()[-1:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- comparison


def voxseg_values(pred_dir: Path, ref_dir: Path, dataset: Path, tolerance: float) -> dict:
    """convention -> case -> class -> metrics, from voxseg's evaluate_folder."""
    import warnings

    from voxseg.evaluate import evaluate_folder

    out = {}
    for convention in ("voxseg", "nnunet", "monai", "brats"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summary = evaluate_folder(pred_dir, ref_dir, dataset, regions=REGIONS, tolerance_mm=tolerance,
                                      out=False, convention=convention)
        out[convention] = {case["name"]: {name: {k: (math.nan if v is None else v) for k, v in m.items()}
                                          for name, m in case["metrics"].items()} for case in summary["per_case"]}
        out[convention]["__mean__"] = {name: {k: (math.nan if v is None else v) for k, v in m.items()}
                                       for name, m in summary["mean"].items()}
    return out


def _defined(value: float) -> bool:
    return value is not None and math.isfinite(value)


def compare(ours: dict, theirs: dict, our_key: str, their_key: str) -> dict:
    """Per case x class: how many values, how many defined on one side only, the largest difference."""
    n, pattern, worst, relative = 0, [], 0.0, 0.0
    for case, classes in theirs.items():
        for name, row in classes.items():
            a, b = ours[case][name][our_key], row[their_key]
            n += 1
            if _defined(a) != _defined(b) or (not _defined(a) and not (math.isnan(a) and math.isnan(b))):
                pattern.append(f"{case}/{name}: voxseg {a:g}, tool {b:g}")
            elif _defined(a):
                worst = max(worst, abs(a - b))
                relative = max(relative, abs(a - b) / abs(b)) if b != 0 else relative
    return {"n": n, "undefined_mismatch": pattern, "max_abs_diff": worst, "max_rel_diff": relative}


def compare_means(ours: dict, theirs: dict, our_key: str, their_key: str) -> dict:
    """Per class: voxseg's mean against the tool's per-case values averaged with NaN left out (nanmean)."""
    n, pattern, worst, relative = 0, [], 0.0, 0.0
    for name in CLASSES:
        values = [row[name][their_key] for row in theirs.values()]
        finite = [v for v in values if not math.isnan(v)]
        tool = float(np.mean(finite)) if finite and all(math.isfinite(v) for v in finite) else math.nan
        mine = ours["__mean__"][name][our_key]
        n += 1
        if _defined(mine) != _defined(tool):
            pattern.append(f"mean {name}: voxseg {mine:g}, tool {tool:g}")
        elif _defined(mine):
            worst = max(worst, abs(mine - tool))
            relative = max(relative, abs(mine - tool) / abs(tool)) if tool != 0 else relative
    return {"n": n, "undefined_mismatch": pattern, "max_abs_diff": worst, "max_rel_diff": relative}


ROWS = [  # (tool, tool setting, tool key, voxseg convention, voxseg key)
    ("nnU-Net", "compute_metrics Dice", "dice", "nnunet", "dice"),
    ("nnU-Net", "compute_metrics IoU", "iou", "nnunet", "iou"),
    ("MONAI", "DiceMetric(ignore_empty=True)", "dice_ignore_empty", "monai", "dice"),
    ("MONAI", "DiceMetric(ignore_empty=False)", "dice", "voxseg", "dice"),
    ("MONAI", "MeanIoU(ignore_empty=True)", "iou_ignore_empty", "monai", "iou"),
    ("MONAI", "MeanIoU(ignore_empty=False)", "iou", "voxseg", "iou"),
    ("MONAI", "HausdorffDistanceMetric(percentile=95, directed=False)", "hd95", "monai", "hd95"),
    ("MONAI", "SurfaceDiceMetric(use_subvoxels=False)", "nsd", "monai", "nsd"),
    ("MONAI", "HausdorffDistanceMetric (by design: pooled, 26-neighbour surface)", "hd95", "voxseg", "hd95"),
    ("MONAI", "SurfaceDiceMetric (by design: 26-neighbour surface)", "nsd", "voxseg", "nsd"),
]
MEAN_ROWS = [
    ("nnU-Net", "nanmean of compute_metrics Dice", "dice", "nnunet", "dice"),
    ("MONAI", "nanmean of DiceMetric(ignore_empty=True)", "dice_ignore_empty", "monai", "dice"),
    ("MONAI", "nanmean of HausdorffDistanceMetric", "hd95", "monai", "hd95"),
    ("MONAI", "nanmean of SurfaceDiceMetric", "nsd", "monai", "nsd"),
]


def table(ours: dict, tools: dict) -> tuple[str, list[dict]]:
    lines = ["| tool | setting | voxseg --convention | values | defined on one side only | max abs diff "
             "| max rel diff |",
             "|---|---|---|---|---|---|---|"]
    results = []
    for rows, compare_fn, unit in ((ROWS, compare, "case x class"), (MEAN_ROWS, compare_means, "class means")):
        for tool, setting, their_key, convention, our_key in rows:
            theirs = tools[tool]
            if isinstance(theirs, str):
                lines.append(f"| {tool} | {setting} | {convention} | - | {theirs} | - | - |")
                continue
            result = compare_fn(ours[convention], theirs, our_key, their_key)
            results.append({"tool": tool, "setting": setting, "convention": convention, "unit": unit, **result})
            lines.append(f"| {tool} | {setting} | {convention} | {result['n']} ({unit}) | "
                         f"{len(result['undefined_mismatch'])} | {result['max_abs_diff']:.2e} | "
                         f"{result['max_rel_diff']:.2e} |")
    return "\n".join(lines), results


def setup_monai() -> None:
    """Create benchmarks/.venv-monai with MONAI (the torch pin takes the local CPU wheel)."""
    subprocess.run([sys.executable, "-m", "venv", str(MONAI_VENV)], check=True)
    subprocess.run([str(MONAI_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "torch==2.13.0",
                    f"monai=={MONAI_VERSION}", "scipy"], check=True)  # MONAI's surface distances need scipy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help=f"create {MONAI_VENV} first")
    parser.add_argument("--tolerance", type=float, default=1.0, help="surface Dice tolerance in mm")
    parser.add_argument("--nnunet-python", type=Path, default=NNUNET_VENV / "bin" / "python")
    parser.add_argument("--monai-python", type=Path, default=MONAI_VENV / "bin" / "python")
    parser.add_argument("--json", type=Path, help="also write the comparison (with every mismatch) here")
    parser.add_argument("--monai-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--nnunet-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.monai_worker:
        print(json.dumps(monai_worker(args.monai_worker, args.tolerance)))
        return 0
    if args.nnunet_worker:
        print(json.dumps(nnunet_worker(args.nnunet_worker)))
        return 0
    if args.setup:
        setup_monai()
    with tempfile.TemporaryDirectory() as tmp:
        pred_dir, ref_dir, dataset = write_fixtures(Path(tmp))
        ours = voxseg_values(pred_dir, ref_dir, dataset, args.tolerance)
        tools = {"MONAI": _run_worker(args.monai_python, "monai", Path(tmp), args.tolerance),
                 "nnU-Net": _run_worker(args.nnunet_python, "nnunet", Path(tmp), args.tolerance)}
    text, results = table(ours, tools)
    print(f"{len(fixtures())} cases x {len(CLASSES)} classes, spacing {SPACING} mm, tolerance {args.tolerance} mm, "
          f"MONAI {MONAI_VERSION}, nnU-Net from {args.nnunet_python}")
    print(text)
    for result in results:
        for line in result["undefined_mismatch"]:
            print(f"  {result['tool']} {result['setting']} vs {result['convention']}: {line}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "tools": tools}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
