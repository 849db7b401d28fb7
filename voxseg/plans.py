"""The plan: the single source of truth shared by preprocessing, training and inference.

`plans.json` is written by `voxseg plan`, is human-readable and editable, and is read back into these
dataclasses, which validate every field so that a hand edit that breaks the plan fails with a clear message.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from voxseg.configtree import parse_value
from voxseg.errors import ConfigError
from voxseg.jsonio import read_json, write_json_atomic
from voxseg.labels import LabelScheme
from voxseg.network_plan import NetworkPlan
from voxseg.normalization import SCHEMES, required_fields
from voxseg.registry import unknown_name_message
from voxseg.schema import check_fields

PLAN_VERSION = 1


@dataclass
class ChannelNormalization:
    """How one input channel is normalised."""

    scheme: str = "zscore"
    """the normalisation scheme: "zscore" (per-case z-score; MRI and most modalities), "ct" (clip to the dataset's
    foreground 0.5/99.5 percentiles, then z-score with the dataset's foreground mean/std) or "none"; any name
    registered in `voxseg.normalization.SCHEMES`."""
    use_nonzero_mask: bool = False
    """z-score statistics computed inside the nonzero (brain) mask only, and voxels outside the mask set to 0. True
    when cropping to the nonzero region shrank the cases noticeably."""
    clip_low: float | None = None
    """lower clip bound of the "ct" scheme: the dataset's foreground 0.5 percentile (a scheme declares the
    fields it needs when it is registered; the others leave them None)."""
    clip_high: float | None = None
    """upper clip bound of the "ct" scheme: the dataset's foreground 99.5 percentile."""
    mean: float | None = None
    """the dataset's foreground mean, subtracted by the "ct" scheme."""
    std: float | None = None
    """the dataset's foreground standard deviation, divided by in the "ct" scheme."""

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError("plans.json: " + unknown_name_message("normalization scheme", self.scheme,
                                                                    SCHEMES.names()))
        missing = [name for name in required_fields(self.scheme) if getattr(self, name) is None]
        if missing:
            raise ConfigError(f"plans.json: the '{self.scheme}' normalization needs "
                              f"{', '.join(required_fields(self.scheme))}; missing: {', '.join(missing)}")


@dataclass
class Plan:
    """Everything later stages need to know about the dataset and the chosen configuration."""

    dataset_name: str
    """name from dataset.json."""
    raw_dataset: str
    """absolute path of the raw dataset the plan was made from."""
    channel_names: dict[str, str]
    """{"0": "T1", ...} as in dataset.json."""
    labels: dict[str, Any]
    """{"background": 0, "edema": 1, ...}; a value may be a list (a region)."""
    file_ending: str
    """raw image file ending, e.g. ".nii.gz"."""
    target_spacing: list[float]
    """spacing every case is resampled to (array axis order, mm)."""
    patch_size: list[int]
    """training patch size in voxels (array axis order)."""
    batch_size: int
    """patches per optimiser step."""
    network: NetworkPlan
    """the U-Net topology."""
    normalization: list[ChannelNormalization]
    """one scheme per channel."""
    regions_class_order: list[int] | None = None
    """for region-based datasets, the label value each region writes back, in order."""
    original_median_spacing: list[float] = field(default_factory=list)
    """the raw cases' median spacing, from the fingerprint (array axis order, mm)."""
    original_median_shape: list[int] = field(default_factory=list)
    """the raw cases' median shape, from the fingerprint (array axis order)."""
    median_shape_after_resample: list[int] = field(default_factory=list)
    """median case shape at target_spacing."""
    anisotropy_axis: int | None = None
    """index of the coarse axis handled separately when resampling, or None."""
    foreground_oversampling: float = 0.33
    """fraction of patches forced to contain foreground."""
    gpu_memory_gb: float = 8.0
    """the memory budget the patch and batch size were planned for."""
    estimated_memory_gb: float | None = None
    """the memory model's estimate of peak training memory for this plan."""
    image_dtype: str = "float16"
    """dtype of the preprocessed images ("float16" or "float32")."""
    inference_mirror_axes: list[int] | None = None
    """the spatial axes test-time mirroring uses when every axis is asked for (a model trained mirrored along some
    axes only, e.g. an imported nnU-Net model's allowed axes); None: all."""
    memory_calibration: dict[str, Any] | None = None
    """the memory model fitted to real steps on a GPU by `voxseg plan --calibrate` (device, scale, fixed_gb, measured
    points), or None when the formula was used as it is."""
    configuration: str = "3d_fullres"
    """which of the planned configurations this is: "3d_fullres" (the default), "2d", "3d_lowres" or
    "3d_cascade_fullres" (see `voxseg.data.configs`)."""
    slice_axis: int = 0
    """2D plans only: the array axis the 2D network slices along (the coarsest axis, nnU-Net's transpose rule); the
    patch covers the other two axes in their order."""
    keep_slice_spacing: bool = False
    """2D plans only: the slice axis keeps each case's own spacing, only the other two axes are resampled (nnU-Net's
    2d preprocessing, set for its imported 2d models); target_spacing's entry for the slice axis is then only a
    typical value. False: every axis is resampled to target_spacing."""
    previous_stage: str | None = None
    """a cascade stage's first stage ("3d_lowres" for "3d_cascade_fullres"), else None."""
    version: int = PLAN_VERSION
    """the plans.json format version (`PLAN_VERSION`)."""

    def __post_init__(self) -> None:
        if isinstance(self.network, dict):
            self.network = NetworkPlan(**_known(NetworkPlan, self.network, "network"))
        self.normalization = [
            ChannelNormalization(**_known(ChannelNormalization, n, "normalization")) if isinstance(n, dict) else n
            for n in self.normalization
        ]
        if len(self.normalization) != len(self.channel_names):
            raise ConfigError(
                f"plans.json: {len(self.channel_names)} channels but {len(self.normalization)} normalization entries"
            )
        ndim = self.network.ndim
        if len(self.patch_size) != ndim:
            raise ConfigError(f"plans.json: patch_size {self.patch_size} must have {ndim} entries like the network")
        if any(p < 1 for p in self.patch_size) or self.batch_size < 1:
            raise ConfigError("plans.json: patch_size entries and batch_size must be positive")
        if len(self.target_spacing) not in (3, ndim) or not all(s > 0 for s in self.target_spacing):
            count = "3" if ndim == 3 else f"{ndim} or 3"
            raise ConfigError(f"plans.json: target_spacing {self.target_spacing} must be {count} positive spacings "
                              "in mm")
        if not 0.0 <= self.foreground_oversampling <= 1.0:
            raise ConfigError("plans.json: foreground_oversampling must be between 0 and 1")
        if self.image_dtype not in ("float16", "float32"):
            raise ConfigError("plans.json: image_dtype must be float16 or float32")
        if not isinstance(self.slice_axis, int) or not 0 <= self.slice_axis < len(self.target_spacing):
            raise ConfigError(f"plans.json: slice_axis {self.slice_axis!r} must be an array axis, "
                              f"0..{len(self.target_spacing) - 1}")
        if self.keep_slice_spacing and ndim != 2:
            raise ConfigError("plans.json: keep_slice_spacing applies to 2D plans only")
        if not isinstance(self.configuration, str) or not self.configuration:
            raise ConfigError("plans.json: configuration must be a name such as 3d_fullres")
        self._check_patch_divisible()

    def case_target_spacing(self, spacing: Sequence[float]) -> list[float]:
        """The spacing a case of `spacing` is resampled to (target_spacing, but see keep_slice_spacing)."""
        target = [float(t) for t in self.target_spacing]
        if self.keep_slice_spacing:
            target[self.slice_axis] = float(spacing[self.slice_axis])
        return target

    def _check_patch_divisible(self) -> None:
        for axis, (p, t) in enumerate(zip(self.patch_size, self.network.total_stride)):
            if p % t:
                raise ConfigError(
                    f"plans.json: patch_size[{axis}]={p} is not divisible by the network's total stride {t} "
                    f"along that axis; use a multiple of {t}"
                )

    def check_runnable(self, action: str) -> None:
        """Refuse `action` (an export) for a cascade stage, which train, predict, benchmark and estimate
        support (they add the first stage's segmentation) but a single exported network does not.

        Raises:
            ConfigError: naming the configuration, what it needs and what to use instead.
        """
        if self.previous_stage is not None:
            raise ConfigError(
                f"configuration '{self.configuration}' is a cascade stage: its network takes the predictions of "
                f"'{self.previous_stage}' as extra input channels, and {action} with a cascade is not supported "
                f"(train, predict, benchmark and estimate are). Use '--configuration {self.previous_stage}' or "
                "'--configuration 3d_fullres' instead")

    # ----- labels (see LabelScheme) -------------------------------------------------------------------------
    @property
    def num_channels(self) -> int:
        """Image channels (files per case)."""
        return len(self.channel_names)

    @property
    def network_in_channels(self) -> int:
        """The network's input channels: the image's, and for a cascade stage one more per foreground label
        (the first stage's segmentation, one-hot; see `voxseg.infer.cascade`)."""
        extra = len(self.foreground_labels) if self.previous_stage is not None else 0
        return self.num_channels + extra

    @property
    def label_scheme(self) -> LabelScheme:
        return LabelScheme(self.labels, self.regions_class_order)

    @property
    def is_region_based(self) -> bool:
        return self.label_scheme.is_region_based

    @property
    def ignore_label(self) -> int | None:
        return self.label_scheme.ignore_label

    @property
    def foreground_labels(self) -> list[int]:
        return self.label_scheme.foreground_labels

    @property
    def regions(self) -> list[list[int]]:
        return self.label_scheme.regions

    @property
    def class_names(self) -> list[str]:
        return self.label_scheme.class_names

    @property
    def num_outputs(self) -> int:
        return self.label_scheme.num_outputs

    # ----- JSON round trip ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        return cls(**_known(cls, data, "plans.json"))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        data = read_json(path, ConfigError, missing="run 'voxseg plan DATASET -o WORKDIR' first",
                         invalid="fix it or re-run 'voxseg plan'")
        if not isinstance(data, dict):
            raise ConfigError(f"{path} holds a {type(data).__name__}, not a plan (a JSON object); re-run 'voxseg plan'")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:  # the schema's messages say "plans.json": name the file read
            text = str(exc)
            raise ConfigError(f"{path}{text.removeprefix('plans.json')}" if text.startswith("plans.json")
                              else f"{path}: {text}") from None


def _known(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Reject unknown keys with the nearest valid one named."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"{where}: " + unknown_name_message("field", key, names))
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)}")
    check_fields(cls, data, where)
    return data


# ----- summary ------------------------------------------------------------------------------------------------
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


def _fmt(values: Any) -> str:  # 1.5x1x1, 128x128x128
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


# ----- overrides ----------------------------------------------------------------------------------------------
# Plan fields no override may set: the version, the memory estimate (derived), which configuration a plan is
# (decided by the planner) and the network section as a
# whole (its fields are set one by one as network.<field>).
_NOT_OVERRIDABLE = ("version", "estimated_memory_gb", "network", "configuration", "previous_stage")
# What a training run may change for itself (`plan.<key>` in the training config): everything that shapes
# patches, batches and the network. The rest of the plan describes the preprocessed data and needs a re-plan.
TRAINING_OVERRIDES = ("patch_size", "batch_size", "foreground_oversampling") + tuple(
    f"network.{f.name}" for f in dataclasses.fields(NetworkPlan))


def override_names() -> list[str]:
    """Every dotted key a plan override may name: plan fields and `network.<field>`."""
    plan_fields = [f.name for f in dataclasses.fields(Plan) if f.name not in _NOT_OVERRIDABLE]
    return plan_fields + [f"network.{f.name}" for f in dataclasses.fields(NetworkPlan)]


def _override_hints() -> dict[str, Any]:
    hints = dict(typing.get_type_hints(Plan))
    hints.update({f"network.{k}": v for k, v in typing.get_type_hints(NetworkPlan).items()})
    return hints


def parse_overrides(overrides: dict[str, Any] | None, allowed: tuple[str, ...] | None = None,
                    prefix: str = "") -> dict[str, Any]:
    """Check override names and parse string values (from the command line) by the field's type.

    Example: {"batch_size": "4", "patch_size": "96,96,96", "network.residual": "true"} ->
    {"batch_size": 4, "patch_size": [96, 96, 96], "network.residual": True}; "patch_sise" raises
    ConfigError "unknown plan option 'patch_sise'; did you mean 'patch_size'? ...".

    Args:
        overrides: dotted key -> value (typed, or text to parse).
        allowed: the keys accepted (default every `override_names()`); a valid plan key outside it is refused
            with the reason (a training run cannot change how the data was preprocessed).
        prefix: how the keys are spelt in messages ("plan." for a training config's `plan.batch_size`).
    """
    hints, valid = _override_hints(), override_names()
    parsed = {}
    for key, value in (overrides or {}).items():
        if key not in valid:
            raise ConfigError(unknown_name_message("plan option", prefix + key,
                                                   [prefix + name for name in allowed or valid]))
        if allowed is not None and key not in allowed:
            raise ConfigError(
                f"plan option '{prefix}{key}' describes the preprocessed data and cannot change for one training "
                f"run; re-plan with 'voxseg plan DATASET -o WORKDIR --set {key}=...' and preprocess again. "
                f"A run may override: {', '.join(prefix + name for name in allowed)}")
        parsed[key] = parse_value(value.strip(), hints[key], prefix + key) if isinstance(value, str) else value
    return parsed


def apply_overrides(plan: Plan, overrides: dict[str, Any] | None) -> Plan:
    """A new plan with dotted overrides set field by field (validated like a loaded plans.json).

    Unlike `voxseg plan --set`, nothing is re-fitted: a patch_size override keeps the network, and must be
    divisible by its total stride. The memory estimate is left as it was (the caller re-estimates it).
    """
    values = parse_overrides(overrides)
    if not values:
        return plan
    data = copy.deepcopy(plan.to_dict())
    for key, value in values.items():
        section, _, leaf = key.rpartition(".")
        (data[section] if section else data)[leaf] = value
    return Plan.from_dict(data)


def plan_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """'field: saved -> current' for every field that differs between two plans' dicts (nested by dots)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += plan_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
