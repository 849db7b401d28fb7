"""The planner: from a dataset fingerprint to `plans.json` (target spacing, normalisation, patch, batch, U-Net).

The heuristics follow nnU-Net v2's `3d_fullres` planner (the facts, re-derived here) and are explained with
worked examples in each function's docstring. In short, for a BraTS-like dataset (4 MRI channels, 1 mm
isotropic, median brain crop 140x170x140, 4 outputs) and an 8 GB GPU the planner chooses:

    target spacing   [1, 1, 1]              per-axis median spacing
    normalisation    zscore inside the nonzero (brain) mask, per channel
    patch size       [128, 128, 128]         shrunk from the median shape until the memory model fits 8 GB
    network          6 stages, features [32, 64, 128, 256, 320, 320], kernels 3x3x3, strides 2 per axis
    batch size       2

and with a 40 GB budget the whole median case (160x192x160, rounded up to the network's stride) and a batch of 5.

The memory model lives in `voxseg.data.memory` and the topology / patch / batch search in
`voxseg.data.topology`; `estimate_memory_gb` and `derive_topology` are re-exported here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from voxseg.atomicio import copy_file, make_output_folder
from voxseg.data.dataset import RawDataset, load_dataset
from voxseg.data.fingerprint import compute_fingerprint, save_fingerprint
from voxseg.data.memory import estimate_memory_gb
from voxseg.labels import LabelScheme
from voxseg.plans import ChannelNormalization, NetworkPlan, Plan, parse_overrides
from voxseg.data.splits import (
    NNUNET_SPLITS_FILE,
    SPLITS_FILE,
    make_fraction_split,
    make_kfold_splits,
    read_nnunet_splits,
    save_splits,
)
from voxseg.data.topology import check_patch_divisible, derive_topology, fit_batch, fit_patch
from voxseg.errors import ConfigError, DatasetError

__all__ = [
    "derive_topology", "describe_plan", "estimate_memory_gb", "make_plan",
    "plan_dataset", "plan_normalization", "plan_target_spacing",
]

ANISOTROPY_RATIO = 3.0  # coarsest / finest median spacing above which an axis is handled separately
NONZERO_MASK_THRESHOLD = 0.75  # z-score inside the nonzero mask when cropping left < 3/4 of the median case
FOREGROUND_OVERSAMPLING = 0.33
NETWORK_TOPOLOGY_KEYS = ("features", "kernel_sizes", "strides")


# ----- spacing and normalisation ---------------------------------------------------------------------------
def plan_target_spacing(spacings: np.ndarray) -> tuple[list[float], int | None]:
    """Target spacing (per-axis median) and the anisotropic axis, if any.

    When the coarsest median spacing is more than 3x the finest, resampling every case to the median would
    interpolate many slices out of few; the coarse axis instead gets the 10th percentile of its spacings
    (finer, so fewer cases lose slices), but never finer than the other axes' median spacing, so it stays the
    coarse axis. That axis is recorded so preprocessing resamples it separately (nearest / linear along it).

    Example: spacings (5.0, 0.8, 0.8) for 9 cases and (3.0, 0.8, 0.8) for one: median (5.0, 0.8, 0.8);
    5.0 > 3 x 0.8, so axis 0 gets the 10th percentile of [3, 5, ..., 5] = 4.8 -> target (4.8, 0.8, 0.8),
    anisotropy_axis 0. For 1 mm isotropic data the target is (1, 1, 1) and anisotropy_axis None.

    Args:
        spacings: (N, ndim) per-case spacings, array axis order.
    """
    spacings = np.asarray(spacings, dtype=np.float64)
    median = np.median(spacings, axis=0)
    coarse = int(np.argmax(median))
    if median[coarse] <= ANISOTROPY_RATIO * median.min():
        return [float(s) for s in median], None
    target = median.copy()
    others = np.delete(median, coarse)
    target[coarse] = max(float(np.percentile(spacings[:, coarse], 10)), float(others.max()))
    return [float(s) for s in target], coarse


def plan_normalization(fingerprint: dict[str, Any], channel_names: dict[str, str]) -> list[ChannelNormalization]:
    """One normalisation scheme per channel.

    - A channel named "CT" (any case): intensities are in Hounsfield units and comparable across cases, so
      the dataset-wide foreground statistics are used: clip to the 0.5 / 99.5 percentiles, then subtract the
      foreground mean and divide by its std (e.g. a liver dataset: clip [-17, 201], mean 99.4, std 39.4).
    - Any other channel (MRI, ...): per-case z-score. When cropping to the nonzero region shrank the median
      case to less than 3/4 of its size (skull-stripped brains: ~0.4), the background is a large constant
      region, so statistics come from the nonzero mask only and the outside stays 0 (`use_nonzero_mask`).
    """
    use_mask = float(fingerprint.get("median_relative_size_after_cropping", 1.0)) < NONZERO_MASK_THRESHOLD
    schemes = []
    for index in sorted(channel_names, key=int):
        if channel_names[index].strip().lower() != "ct":
            schemes.append(ChannelNormalization("zscore", use_nonzero_mask=use_mask))
            continue
        stats = fingerprint.get("foreground_intensity", {}).get(str(index), {})
        needed = ("percentile_00_5", "percentile_99_5", "mean", "std")
        if any(stats.get(key) is None for key in needed):
            raise DatasetError(
                f"channel {index} ('{channel_names[index]}') is CT but the fingerprint has no foreground intensity "
                "statistics for it (no labelled foreground voxels?); check the labels or rename the channel"
            )
        schemes.append(
            ChannelNormalization(
                "ct",
                clip_low=float(stats["percentile_00_5"]),
                clip_high=float(stats["percentile_99_5"]),
                mean=float(stats["mean"]),
                std=max(float(stats["std"]), 1e-8),
            )
        )
    return schemes


# ----- the plan ----------------------------------------------------------------------------------------------
def _choose_patch_and_network(
    values: dict[str, Any], spacing: list[float], median_shape: list[int], budget: float, channels: int, outputs: int
) -> tuple[list[int], NetworkPlan]:
    """Patch and network: fitted to the budget, or derived for an overridden patch; network.* overrides last.

    Pops the patch_size and network.* entries it uses from `values`.
    """
    block = {k: v for k, v in NetworkPlan().__dict__.items() if k not in NETWORK_TOPOLOGY_KEYS}
    block.update({k[8:]: values.pop(k) for k in list(values) if k.startswith("network.") and k[8:] in block})
    topology = {k[8:]: values.pop(k) for k in list(values) if k.startswith("network.")}
    if "patch_size" in values:
        patch = [int(p) for p in values.pop("patch_size")]
        if len(patch) != len(spacing):
            raise ConfigError(f"override patch_size={patch} needs {len(spacing)} entries for a {len(spacing)}D plan")
        network = derive_topology(patch, spacing, **block)
    else:
        patch, network = fit_patch(median_shape, spacing, budget, block, channels, outputs)
    if topology:
        network = NetworkPlan(**{**network.__dict__, **topology})
    check_patch_divisible(patch, network)
    return patch, network


def check_gpu_memory(gpu_memory_gb: float) -> float:
    """The GPU memory budget in GiB the plan is sized for: a positive number."""
    if not (isinstance(gpu_memory_gb, (int, float)) and gpu_memory_gb > 0 and np.isfinite(gpu_memory_gb)):
        raise ConfigError(f"gpu_memory_gb={gpu_memory_gb!r}: the GPU memory to plan for must be a positive number "
                          "of GiB, e.g. 8 (voxseg plan --gpu-memory)")
    return float(gpu_memory_gb)


def make_plan(
    fingerprint: dict[str, Any],
    dataset: RawDataset,
    gpu_memory_gb: float = 8.0,
    overrides: dict[str, Any] | None = None,
    dims: int = 3,
) -> Plan:
    """Plan a configuration for `dataset` from its fingerprint.

    Args:
        fingerprint: from `voxseg.data.fingerprint.compute_fingerprint` (needs spacings, shapes_after_crop,
            median_relative_size_after_cropping and, for CT channels, foreground_intensity).
        dataset: the raw dataset (channel names, labels, file ending).
        gpu_memory_gb: memory budget of one GPU; patch and batch are chosen so the estimate fits it.
        overrides: dotted keys, values typed or strings (see `parse_overrides`). A `patch_size`
            override re-derives the network for that patch (unless network.features/kernel_sizes/strides are
            overridden too); the batch is then re-fitted unless `batch_size` is overridden.
        dims: 3 for the 3D full-resolution configuration, 2 for a 2D configuration (slices along axis 0,
            kernels and strides over the last two axes).
    """
    if dims not in (2, 3):
        raise ConfigError(f"dims={dims}: plan a 2 or 3 dimensional configuration")
    values = parse_overrides(overrides)
    budget = check_gpu_memory(float(values.pop("gpu_memory_gb", gpu_memory_gb)))
    spacings = np.asarray(fingerprint["spacings"], dtype=np.float64)
    shapes = np.asarray(fingerprint["shapes_after_crop"], dtype=np.float64)
    target, anisotropy_axis = plan_target_spacing(spacings)
    target = [float(s) for s in values.pop("target_spacing", target)]
    if len(target) != spacings.shape[1]:
        raise ConfigError(f"override target_spacing={target} needs {spacings.shape[1]} entries (array axis order)")
    resampled = shapes * spacings / np.asarray(target)  # (N, 3) per-case shape at the target spacing
    median_shape = [int(round(s)) for s in np.median(resampled, axis=0)]
    dataset_voxels = float(np.prod(resampled, axis=1).sum())

    channels, outputs = dataset.num_channels, LabelScheme(dataset.labels).num_outputs
    spacing_net, shape_net = (target, median_shape) if dims == 3 else (target[1:], median_shape[1:])
    patch, network = _choose_patch_and_network(values, spacing_net, shape_net, budget, channels, outputs)
    if "batch_size" in values:
        batch = int(values.pop("batch_size"))
    else:
        batch = fit_batch(network, patch, budget, channels, outputs, dataset_voxels)

    fields: dict[str, Any] = dict(
        dataset_name=dataset.name,
        raw_dataset=str(dataset.root),
        channel_names=dataset.channel_names,
        labels=dataset.labels,
        regions_class_order=dataset.regions_class_order,
        file_ending=dataset.file_ending,
        original_median_spacing=[float(s) for s in np.median(spacings, axis=0)],
        original_median_shape=[int(round(s)) for s in np.median(shapes, axis=0)],
        target_spacing=target,
        anisotropy_axis=anisotropy_axis,
        normalization=plan_normalization(fingerprint, dataset.channel_names),
        median_shape_after_resample=median_shape,
        patch_size=patch,
        batch_size=batch,
        network=network,
        foreground_oversampling=FOREGROUND_OVERSAMPLING,
        gpu_memory_gb=budget,
        image_dtype="float16",
    )
    fields.update(values)
    fields["estimated_memory_gb"] = round(estimate_memory_gb(network, patch, batch, channels, outputs), 3)
    return Plan(**fields)


def plan_dataset(
    dataset_dir: str | Path,
    workdir: str | Path,
    gpu_memory_gb: float = 8.0,
    overrides: dict[str, Any] | None = None,
    num_folds: int = 5,
    val_fraction: float | None = None,
    seed: int = 12345,
    num_workers: int = 1,
    dims: int = 3,
) -> Plan:
    """Check, fingerprint and plan a raw dataset; write the work directory.

    Writes WORKDIR/fingerprint.json, plans.json, splits.json (only if it does not exist yet, so a hand-made
    split is kept) and a copy of dataset.json. The folds are nnU-Net's `splits_final.json` when the raw dataset
    folder holds one (checked against the cases), else `num_folds` random folds; `val_fraction` makes one random
    split instead.

    Raises:
        DatasetError: the dataset check found problems (the message lists them).
    """
    from voxseg.data.check import check_dataset  # lazy: check pulls in more I/O than planning needs

    check_gpu_memory(gpu_memory_gb)
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        make_output_folder(workdir, "plan -o")  # says it is a file
    dataset = load_dataset(dataset_dir)
    report = check_dataset(dataset.root, num_workers=num_workers)
    if not report.ok:
        raise DatasetError(report.format())
    # every option is validated (splits made, plan built) before anything is written
    names = [case.name for case in dataset.cases]
    nnunet_splits = dataset.root / NNUNET_SPLITS_FILE
    if nnunet_splits.is_file() and val_fraction is None:  # the folds an nnU-Net user already has
        splits = read_nnunet_splits(nnunet_splits, names)
    else:
        splits = make_fraction_split(names, val_fraction, seed) if val_fraction is not None else \
            make_kfold_splits(names, num_folds, seed)
    fingerprint = compute_fingerprint(dataset, num_workers=num_workers)
    plan = make_plan(fingerprint, dataset, gpu_memory_gb=gpu_memory_gb, overrides=overrides, dims=dims)
    workdir.mkdir(parents=True, exist_ok=True)
    save_fingerprint(workdir / "fingerprint.json", fingerprint)
    plan.save(workdir / "plans.json")
    if not (workdir / SPLITS_FILE).exists():
        save_splits(workdir, splits)
    copy_file(dataset.root / "dataset.json", workdir / "dataset.json")
    return plan


def describe_plan(plan: Plan) -> str:
    """A short human summary of a plan, e.g. for `voxseg plan` to print."""
    net = plan.network
    aniso = f" (axis {plan.anisotropy_axis} anisotropic)" if plan.anisotropy_axis is not None else ""
    norms = ", ".join(
        n.scheme + ("+mask" if n.use_nonzero_mask else "") for n in plan.normalization
    )
    memory = f"{plan.estimated_memory_gb:.1f}" if plan.estimated_memory_gb is not None else "?"
    lines = [
        f"dataset        {plan.dataset_name}: {plan.num_channels} channel(s), {plan.num_outputs} output(s)"
        + (" (regions)" if plan.is_region_based else ""),
        f"spacing        {_fmt(plan.original_median_spacing)} -> {_fmt(plan.target_spacing)} mm{aniso}",
        f"median shape   {_fmt(plan.median_shape_after_resample)} at target spacing",
        f"normalisation  {norms}",
        f"patch x batch  {_fmt(plan.patch_size)} x {plan.batch_size}",
        f"network        {plan.network.name}{' (residual)' if net.residual else ''}, {net.n_stages} stages, "
        f"features {net.features}, total stride {_fmt(net.total_stride)}",
        f"memory         ~{memory} GB estimated (budget {plan.gpu_memory_gb:g} GB)",
    ]
    return "\n".join(lines)


def _fmt(values: Any) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
