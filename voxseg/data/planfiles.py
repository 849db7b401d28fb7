"""Writing what `voxseg plan` decided into a work directory: every configuration's fingerprint, plan and
dataset.json copy, the splits and the configuration index, staged first and renamed into place."""
from __future__ import annotations

import os
import shutil
from typing import Any

from voxseg.atomicio import copy_file, staging_folder, sweep_stale_staging
from voxseg.data.configs import configuration_entry, write_index
from voxseg.data.dataset import RawDataset
from voxseg.data.fingerprint import save_fingerprint
from voxseg.data.splits import save_splits
from voxseg.plans import Plan
from voxseg.workdir import WorkDir


def write_plan_files(workdir: WorkDir, dataset: RawDataset, fingerprint: dict[str, Any], plans: dict[str, Plan],
                   splits: list[dict[str, list[str]]]) -> None:
    """Every configuration's folder (fingerprint, plan, dataset.json copy), the index and, when none exists yet,
    the splits: written into a staging folder first, then renamed into place (the splits first, the default
    plans.json and the index last), so a failed write (a full disk) leaves the work directory as it was."""
    default = next(iter(plans))
    entries = {name: configuration_entry(name, default, plan.previous_stage,
                                         "3d_cascade_fullres" if name == "3d_lowres" else None)
               for name, plan in plans.items()}
    created = not workdir.path.exists()
    workdir.path.mkdir(parents=True, exist_ok=True)  # a location that cannot be written is named as given
    sweep_stale_staging(workdir.path)
    staging = staging_folder(workdir.path, "plan")
    try:
        for name, plan in plans.items():
            folder = WorkDir(staging / entries[name]["path"])
            folder.path.mkdir(parents=True, exist_ok=True)
            save_fingerprint(folder.fingerprint, fingerprint)
            plan.save(folder.plans)
            copy_file(dataset.root / "dataset.json", folder.dataset_json)  # the raw dataset's, copied
        if not workdir.splits.exists():
            save_splits(staging, splits)
        write_index(staging, default, entries)
        last = [WorkDir(staging).plans, WorkDir(staging).configurations]
        staged = sorted(p for p in staging.rglob("*") if p.is_file() and p not in last)
        staged.sort(key=lambda p: p != WorkDir(staging).splits)  # the splits first
        for path in staged + last:
            destination = workdir.path / path.relative_to(staging)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, destination)
    except BaseException:
        if created and not any(workdir.path.iterdir()):
            workdir.path.rmdir()  # nothing was written: the folder this run made goes too
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
