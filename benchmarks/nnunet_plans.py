"""nnU-Net 2.8.1's own planner on the fingerprints of benchmarks/plan_examples.py, for comparison.

    /path/to/nnunet-venv/bin/python benchmarks/nnunet_plans.py

Run it with a Python that has nnunetv2 installed (not voxseg's environment: nnU-Net is no voxseg dependency).
It writes a throw-away nnU-Net raw dataset (dataset.json and one tiny case, which nnU-Net's reader lookup
needs) and the fingerprint into a temporary folder, runs `ExperimentPlanner(...).plan_experiment()` and prints
each configuration's spacing, median shape, patch, batch and strides. The fingerprint's numbers (spacings,
cropped shapes, case count) are what the planner uses; the one case on disk is never read for them.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

EXAMPLES = {
    "BraTS-like": dict(channels={"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
                       labels={"background": 0, "edema": 1, "core": 2, "enhancing": 3},
                       spacing=[1.0, 1.0, 1.0], shape=[134, 168, 138], cases=400, relative=0.45),
    "CT, large and anisotropic": dict(channels={"0": "CT"}, labels={"background": 0, "liver": 1, "tumour": 2},
                                      spacing=[2.5, 0.8, 0.8], shape=[400, 512, 512], cases=100, relative=0.9),
}


def write_dataset(root: Path, dataset_id: int, example: dict) -> str:
    import numpy as np
    import SimpleITK as sitk

    name = f"Dataset{dataset_id:03d}_Example"
    raw = root / "raw" / name
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": example["channels"], "labels": example["labels"], "numTraining": example["cases"],
        "file_ending": ".nii.gz"}))
    image = sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32))
    for channel in example["channels"]:
        sitk.WriteImage(image, str(raw / "imagesTr" / f"case_{int(channel):04d}.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.uint8)), str(raw / "labelsTr" / "case.nii.gz"))
    stats = {"mean": 60.0, "std": 80.0, "median": 55.0, "min": -1000.0, "max": 2000.0,
             "percentile_00_5": -150.0, "percentile_99_5": 300.0}
    n = example["cases"]
    fingerprint = {"spacings": [example["spacing"]] * n, "shapes_after_crop": [example["shape"]] * n,
                   "median_relative_size_after_cropping": example["relative"],
                   "foreground_intensity_properties_per_channel": {c: stats for c in example["channels"]}}
    pre = root / "preprocessed" / name
    pre.mkdir(parents=True)
    (pre / "dataset_fingerprint.json").write_text(json.dumps(fingerprint))
    return name


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = {title: write_dataset(root, 900 + i, ex) for i, (title, ex) in enumerate(EXAMPLES.items())}
        for key, folder in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"),
                            ("nnUNet_results", "results")):
            os.environ[key] = str(root / folder)
        from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

        for title, name in names.items():
            plans = ExperimentPlanner(name, 8).plan_experiment()
            print(f"{title}: transpose_forward {plans['transpose_forward']}, 8 GiB")
            for config, plan in plans["configurations"].items():
                if "patch_size" not in plan:
                    print(f"  {config:<19} {plan}")
                    continue
                strides = [list(s) for s in plan["architecture"]["arch_kwargs"]["strides"][1:]]
                spacing = "x".join(f"{s:.4g}" for s in plan["spacing"])
                median = [round(float(m)) for m in plan["median_image_size_in_voxels"]]
                print(f"  {config:<19} spacing {spacing:<18} median {median} "
                      f"patch {[int(p) for p in plan['patch_size']]} x {plan['batch_size']} strides {strides}")


if __name__ == "__main__":
    main()
