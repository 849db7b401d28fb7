"""The planner: from a dataset fingerprint to `plans.json` (target spacing, normalisation, patch, batch, U-Net).

The heuristics follow nnU-Net v2's planner (the facts, re-derived here) and are explained with worked
examples in each function's docstring. `make_plans` plans every configuration that applies, as nnU-Net does:
3d_fullres, 2d, and, for images much larger than the full-resolution patch, 3d_lowres with the cascade
3d_cascade_fullres on top of it (`voxseg.data.configs` stores them). For a BraTS-like dataset (4 MRI
channels, 1 mm isotropic, median brain crop 134x168x138, 4 outputs) and an 8 GB GPU the planner chooses:

    target spacing   [1, 1, 1]              per-axis median spacing
    normalisation    zscore inside the nonzero (brain) mask, per channel
    3d_fullres       patch 112x160x128 (the median case's aspect ratio, shrunk until the memory model fits
                     8 GB), 6 stages, features [32, 64, 128, 256, 320, 320], kernels 3x3x3, last stride
                     [1, 2, 2], batch 2
    2d               slices along axis 0, patch 192x160, 6 stages, features up to 512
    3d_lowres        none: the 3d_fullres patch 112x160x128 covers 74% of the median case 134x168x138 (>= 25%)

The memory model lives in `voxseg.data.memory` and the topology / patch / batch search in
`voxseg.data.topology`; `estimate_memory_gb` and `derive_topology` are re-exported here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxseg.atomicio import make_output_folder
from voxseg.data.dataset import RawDataset, load_dataset
from voxseg.data.fingerprint import compute_fingerprint
from voxseg.data.lowres import decide_lowres
from voxseg.data.memory import estimate_memory_gb
from voxseg.data.plan_options import PlanOptions, check_gpu_memory
from voxseg.data.planfiles import write_plan_files
from voxseg.data.splits import (
    NNUNET_SPLITS_FILE,
    make_fraction_split,
    make_kfold_splits,
    read_nnunet_splits,
)
from voxseg.data.topology import check_patch_divisible, derive_topology, fit_batch, fit_patch
from voxseg.errors import ConfigError, DatasetError
from voxseg.labels import LabelScheme
from voxseg.plans import ChannelNormalization, NetworkPlan, Plan, describe_plan, parse_overrides
from voxseg.workdir import WorkDir

__all__ = [
    "derive_topology", "describe_plan", "estimate_memory_gb", "make_plan", "make_plans",
    "plan_dataset", "plan_normalization", "plan_slice_axis", "plan_target_spacing",
]

ANISOTROPY_RATIO = 3.0  # nnU-Net's anisotropy threshold: coarsest spacing (and voxel count) ratio of 3
NONZERO_MASK_THRESHOLD = 0.75  # z-score inside the nonzero mask when cropping left < 3/4 of the median case
FOREGROUND_OVERSAMPLING = 0.33
NETWORK_TOPOLOGY_KEYS = ("features", "kernel_sizes", "strides")
# overrides that fix one configuration's shape, spacing or topology: given to the default configuration only
SHAPE_OVERRIDES = ("patch_size", "batch_size", "target_spacing", "median_shape_after_resample", "slice_axis") + \
    tuple(f"network.{k}" for k in NETWORK_TOPOLOGY_KEYS)


# ----- spacing and normalisation ---------------------------------------------------------------------------
def plan_target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[list[float], int | None]:
    """Target spacing (per-axis median) and the anisotropic axis, if any.

    The target is the per-axis median spacing, except for data that is anisotropic in spacing AND in voxels
    (nnU-Net's rule): the coarsest median spacing is more than 3x the coarsest of the other axes, and the
    median cropped shape has more than 3x fewer voxels along that axis than along any other. Resampling every
    case to the median would then interpolate many slices out of few, so the coarse axis gets the 10th
    percentile of its spacings (finer, so fewer cases lose slices), but never finer than the other axes.

    `anisotropy_axis` (preprocessing resamples it separately: in plane first, then along it alone) is the
    coarsest axis whenever its median spacing is more than 3x the finest one, whatever the voxel counts.

    Example: spacings (5.0, 0.8, 0.8) for 9 cases and (3.0, 0.8, 0.8) for one, shapes 40x320x320: 5.0 >
    3 x 0.8 and 40 x 3 < 320, so axis 0 gets the 10th percentile of [3, 5, ..., 5] = 4.8 -> target (4.8, 0.8,
    0.8), anisotropy_axis 0. The same spacings with shapes 200x320x320 (200 x 3 >= 320) keep the median
    (5, 0.8, 0.8), still anisotropy_axis 0. For 1 mm isotropic data the target is (1, 1, 1), axis None.

    Args:
        spacings: (N, ndim) per-case spacings, array axis order.
        shapes: (N, ndim) per-case shapes after cropping (voxels, as in the raw images).
    """
    spacings = np.asarray(spacings, dtype=np.float64)
    median = np.median(spacings, axis=0)
    median_shape = np.median(np.asarray(shapes, dtype=np.float64), axis=0)
    coarse = int(np.argmax(median))
    others = [a for a in range(len(median)) if a != coarse]
    anisotropy_axis = coarse if median[coarse] > ANISOTROPY_RATIO * median.min() else None
    target = median.copy()
    aniso_spacing = median[coarse] > ANISOTROPY_RATIO * max(median[a] for a in others)
    aniso_voxels = median_shape[coarse] * ANISOTROPY_RATIO < min(median_shape[a] for a in others)
    if aniso_spacing and aniso_voxels:
        target[coarse] = max(float(np.percentile(spacings[:, coarse], 10)), max(float(median[a]) for a in others))
    return [float(s) for s in target], anisotropy_axis


def plan_slice_axis(target_spacing: list[float], median_spacing: list[float] | None = None) -> int:
    """The axis a 2D configuration slices along: the coarsest axis of the target spacing (nnU-Net's transpose
    rule puts it first). A tie goes to the axis with the coarser median spacing (the anisotropic axis whose
    10th percentile was clamped to the others), then to the first axis (axis 0 for isotropic data).
    Example: (4.8, 0.8, 0.8) -> 0, (0.8, 0.8, 3) -> 2, (1, 1, 1) with median spacing (1, 1, 4) -> 2."""
    median = median_spacing if median_spacing is not None else target_spacing
    return max(range(len(target_spacing)), key=lambda a: (float(target_spacing[a]), float(median[a])))


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
    values: dict[str, Any], spacing: list[float], median_shape: list[int], budget: float, channels: int,
    outputs: int, cube: bool = False,
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
        patch, network = fit_patch(median_shape, spacing, budget, block, channels, outputs, cube=cube)
    if topology:
        network = NetworkPlan(**{**network.__dict__, **topology})
    check_patch_divisible(patch, network)
    return patch, network


@dataclass
class _Planning:
    """What every configuration of one dataset shares (the fingerprint's facts and the planning options)."""

    base: dict[str, Any]  # Plan fields common to every configuration
    values: dict[str, Any]  # overrides left for the default configuration
    budget: float
    channels: int
    outputs: int
    cube: bool

    def configuration(self, name: str, spacing: list[float], median_shape: list[int], dataset_voxels: float,
                      slice_axis: int, overrides: dict[str, Any]) -> Plan:
        """One configuration: 3D over every axis, or 2D over the axes other than `slice_axis`."""
        values = dict(overrides)
        axes = [a for a in range(len(spacing)) if name != "2d" or a != slice_axis]
        patch, network = _choose_patch_and_network(values, [spacing[a] for a in axes],
                                                   [median_shape[a] for a in axes], self.budget, self.channels,
                                                   self.outputs, self.cube)
        batch = int(values.pop("batch_size")) if "batch_size" in values else \
            fit_batch(network, patch, self.budget, self.channels, self.outputs, dataset_voxels)
        fields = dict(self.base, target_spacing=[float(s) for s in spacing], median_shape_after_resample=median_shape,
                      patch_size=patch, batch_size=batch, network=network, configuration=name, slice_axis=slice_axis)
        fields.update(values)
        fields["estimated_memory_gb"] = round(estimate_memory_gb(network, patch, batch, self.channels, self.outputs), 3)
        return Plan(**fields)


def _prepare(fingerprint: dict[str, Any], dataset: RawDataset, gpu_memory_gb: float,
             overrides: dict[str, Any] | None, cube: bool) -> tuple[_Planning, list[float], list[int], float, int]:
    """The shared facts, and the full-resolution spacing, median shape, dataset voxels and slice axis."""
    values = parse_overrides(overrides)
    budget = check_gpu_memory(float(values.pop("gpu_memory_gb", gpu_memory_gb)))
    spacings = np.asarray(fingerprint["spacings"], dtype=np.float64)
    shapes = np.asarray(fingerprint["shapes_after_crop"], dtype=np.float64)
    median_spacing = [float(s) for s in np.median(spacings, axis=0)]
    target, anisotropy_axis = plan_target_spacing(spacings, shapes)
    target = [float(s) for s in values.pop("target_spacing", target)]
    if len(target) != spacings.shape[1]:
        raise ConfigError(f"override target_spacing={target} needs {spacings.shape[1]} entries (array axis order)")
    resampled = shapes * spacings / np.asarray(target)  # (N, 3) per-case shape at the target spacing
    median_shape = [int(round(s)) for s in np.median(resampled, axis=0)]
    dataset_voxels = float(np.prod(resampled, axis=1).sum())
    slice_axis = int(values.pop("slice_axis", plan_slice_axis(target, median_spacing)))
    base = dict(
        dataset_name=dataset.name, raw_dataset=str(dataset.root), channel_names=dataset.channel_names,
        labels=dataset.labels, regions_class_order=dataset.regions_class_order, file_ending=dataset.file_ending,
        original_median_spacing=median_spacing,
        original_median_shape=[int(round(s)) for s in np.median(shapes, axis=0)],
        anisotropy_axis=anisotropy_axis, normalization=plan_normalization(fingerprint, dataset.channel_names),
        foreground_oversampling=FOREGROUND_OVERSAMPLING, gpu_memory_gb=budget, image_dtype="float16",
    )
    planning = _Planning(base, values, budget, dataset.num_channels, LabelScheme(dataset.labels).num_outputs, cube)
    return planning, target, median_shape, dataset_voxels, slice_axis


def make_plans(
    fingerprint: dict[str, Any],
    dataset: RawDataset,
    gpu_memory_gb: float = 8.0,
    overrides: dict[str, Any] | None = None,
    cube_patch: bool = False,
    only_2d: bool = False,
    notes: dict[str, str] | None = None,
) -> dict[str, Plan]:
    """Every configuration nnU-Net would plan for `dataset`, by name, the default first.

    - **3d_fullres** (the default): the target spacing, patch and network of `fit_patch`; planned when the
      median case has more than one slice along the slice axis.
    - **2d**: slices along `plan_slice_axis` (the coarsest axis), the patch over the other two axes.
    - **3d_lowres** (`voxseg.data.lowres.plan_lowres`) when the 3d_fullres patch covers less than a quarter
      of the median case, and **3d_cascade_fullres**: the 3d_fullres plan as the second stage of a cascade
      on it (its previous_stage is 3d_lowres).

    Overrides apply in full to the default configuration (and the cascade, its copy); the other
    configurations take those that do not fix a shape, spacing or topology (e.g. network.residual).

    Args:
        fingerprint, dataset, gpu_memory_gb, overrides: as for `make_plan`.
        cube_patch: fit 3D patches with the cube rule (`fit_patch(cube=True)`) instead of the aspect ratio.
        only_2d: plan the 2d configuration alone, as the default (`voxseg plan --2d`).
        notes: filled with {configuration: why it was not planned}, e.g. {"3d_lowres": "3d_lowres and
            3d_cascade_fullres not planned: the 3d_fullres patch 112x160x128 covers 74% of the median case ..."}.
    """
    planning, target, median_shape, dataset_voxels, slice_axis = _prepare(
        fingerprint, dataset, gpu_memory_gb, overrides, cube_patch)
    shared = {k: v for k, v in planning.values.items() if k not in SHAPE_OVERRIDES}
    three_d = median_shape[slice_axis] > 1 and not only_2d
    notes = {} if notes is None else notes
    if not three_d:
        notes["3d_fullres"] = "3d configurations not planned: " + (
            "--2d plans the 2d configuration alone" if only_2d else
            f"the median case has a single slice along axis {slice_axis} (a 2D dataset)")
    plans: dict[str, Plan] = {}
    if three_d:
        plans["3d_fullres"] = planning.configuration("3d_fullres", target, median_shape, dataset_voxels,
                                                     slice_axis, planning.values)
    plans["2d"] = planning.configuration("2d", target, median_shape, dataset_voxels, slice_axis,
                                         shared if three_d else planning.values)
    if three_d:
        fullres = plans["3d_fullres"]
        lowres, reason = decide_lowres(fullres, lambda spacing, shape, voxels: planning.configuration(
            "3d_lowres", spacing, shape, voxels, slice_axis, shared), dataset_voxels)
        if lowres is None:
            notes["3d_lowres"] = f"3d_lowres and 3d_cascade_fullres not planned: {reason}"
        else:
            plans["3d_lowres"] = lowres
            plans["3d_cascade_fullres"] = dataclasses.replace(
                fullres, configuration="3d_cascade_fullres", previous_stage="3d_lowres")
    return plans


def make_plan(
    fingerprint: dict[str, Any],
    dataset: RawDataset,
    gpu_memory_gb: float = 8.0,
    overrides: dict[str, Any] | None = None,
    dims: int = 3,
    cube_patch: bool = False,
) -> Plan:
    """Plan one configuration for `dataset` from its fingerprint: 3d_fullres, or 2d with `dims=2`.

    Args:
        fingerprint: from `voxseg.data.fingerprint.compute_fingerprint` (needs spacings, shapes_after_crop,
            median_relative_size_after_cropping and, for CT channels, foreground_intensity).
        dataset: the raw dataset (channel names, labels, file ending).
        gpu_memory_gb: memory budget of one GPU; patch and batch are chosen so the estimate fits it.
        overrides: dotted keys, values typed or strings (see `parse_overrides`). A `patch_size`
            override re-derives the network for that patch (unless network.features/kernel_sizes/strides are
            overridden too); the batch is then re-fitted unless `batch_size` is overridden.
        dims: 3 for the 3D full-resolution configuration, 2 for the 2D configuration (slices along
            `plan_slice_axis`, kernels and strides over the other two axes).
        cube_patch: the cube rule for the 3D patch (see `fit_patch`).
    """
    if dims not in (2, 3):
        raise ConfigError(f"dims={dims}: plan a 2 or 3 dimensional configuration")
    planning, target, median_shape, dataset_voxels, slice_axis = _prepare(
        fingerprint, dataset, gpu_memory_gb, overrides, cube_patch)
    name = "3d_fullres" if dims == 3 else "2d"
    return planning.configuration(name, target, median_shape, dataset_voxels, slice_axis, planning.values)


def plan_dataset(
    dataset_dir: str | Path,
    workdir: str | Path,
    options: PlanOptions | None = None,
    notes: dict[str, str] | None = None,
    **fields: Any,
) -> Plan:
    """Check, fingerprint and plan a raw dataset; write the work directory. Returns the default plan.

    Writes WORKDIR/fingerprint.json, plans.json (the default configuration, 3d_fullres), splits.json (only if
    it does not exist yet, so a hand-made split is kept), a copy of dataset.json, and every other configuration
    `make_plans` plans into WORKDIR/configs/NAME/ with the index WORKDIR/configurations.json (see
    `voxseg.data.configs`). The folds are nnU-Net's `splits_final.json` when the raw dataset folder holds one
    (checked against the cases), else random folds or one random split (`PlanOptions`). `notes` is filled as by
    `make_plans` (why a configuration was not planned). `options`/`fields`: how to plan (`PlanOptions`;
    `fields` replace single ones, e.g. `plan_dataset(raw, work, gpu_memory_gb=8, num_folds=3)`).

    Raises:
        DatasetError: the dataset check found problems (the message lists them).
    """
    from voxseg.data.check import check_dataset  # lazy: check pulls in more I/O than planning needs

    options = PlanOptions.build(options, **fields)
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        make_output_folder(workdir, "plan -o")  # says it is a file
    dataset = load_dataset(dataset_dir)
    report = check_dataset(dataset.root, num_workers=options.num_workers)
    if not report.ok:
        raise DatasetError(report.format())
    # every option is validated (splits made, plans built) before anything is written
    splits = _splits(dataset, options, notes)
    fingerprint = compute_fingerprint(dataset, num_workers=options.num_workers)
    plans = make_plans(fingerprint, dataset, gpu_memory_gb=options.gpu_memory_gb, overrides=options.overrides,
                       cube_patch=options.cube_patch, only_2d=options.dims == 2, notes=notes)
    write_plan_files(WorkDir(workdir), dataset, fingerprint, plans, splits)
    return plans[next(iter(plans))]


def _splits(dataset: RawDataset, options: PlanOptions, notes: dict[str, str] | None = None
            ) -> list[dict[str, list[str]]]:
    """nnU-Net's splits_final.json of the dataset when it has one (and no val_fraction is asked), else random
    folds or one random split. A dataset of one case has one fold that trains on it without validation (no
    split is possible); `notes["splits"]` says so."""
    names = [case.name for case in dataset.cases]
    if len(names) == 1:
        if notes is not None:
            notes["splits"] = (f"1 training case ({names[0]}): no validation split is possible, so splits.json has "
                               "one fold that trains on it without validation; train with 'voxseg train WORKDIR "
                               "--fold all' (or --fold 0), and predict or evaluate on other data")
        return [{"train": names, "val": []}]
    nnunet_splits = dataset.root / NNUNET_SPLITS_FILE
    if nnunet_splits.is_file() and options.val_fraction is None:  # the folds an nnU-Net user already has
        return read_nnunet_splits(nnunet_splits, names)
    if options.val_fraction is not None:
        return make_fraction_split(names, options.val_fraction, options.seed)
    return make_kfold_splits(names, options.num_folds, options.seed)
