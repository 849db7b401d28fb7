"""Inference settings: `InferConfig`, the one home of every inference default, and `Tiling`, one
sliding-window pass's settings resolved for a network on a device.

`InferConfig` holds what `voxseg predict` can be told (tile step, tile batch, mirroring, precision, device,
backend, folds, checkpoint, outputs); each field has its documentation under it, and its default here is the
only one: the flags of `voxseg predict` are derived from the fields (`voxseg.cli.infer.PREDICT_FLAGS`), and
the Predictor, full validation (training's with `voxseg.train.evaluation.validation_config`), the ensembles of
cross-validation and `voxseg benchmark` all take an InferConfig. The patch is not here: it is the plan's.

Example:
    >>> config = infer_config(["step=0.25", "mirror_axes=none"])
    >>> (config.step, config.tile_batch, config.mirror_axes)
    (0.25, 4, 'none')
    >>> predictor = Predictor.from_workdir("work/synth", config)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from voxseg.checkpoint import CHECKPOINT_CHOICES
from voxseg.configtree import build_dataclass, check_choice, locate_option, parse_value, replace_fields
from voxseg.data.io import SUPPORTED_ENDINGS
from voxseg.devices import AMP_CHOICES, is_device_name, resolve_amp
from voxseg.errors import ConfigError
from voxseg.infer.cpu_forward import VARIANTS as CPU_FORWARD_VARIANTS
from voxseg.plans import Plan

BACKENDS = ("auto", "torch", "onnxruntime")
MIRROR_WORDS = ("all", "none")  # mirror_axes given as a word instead of axes
OUTPUT_FORMATS = ("nifti", "dicom-seg", "rtstruct")

__all__ = ["BACKENDS", "OUTPUT_FORMATS", "InferConfig", "Tiling", "infer_config"]


@dataclass
class InferConfig:
    """Every inference setting, with its default (see the module docstring)."""

    folds: list[int] | str | None = None
    """Folds to predict with, averaged in logit space: 0 | 0,1,2 | all (fold_all, else every trained fold);
    none = every trained fold, or fold_all when it is the only trained model."""
    checkpoint: str = field(default="final", metadata={"choices": CHECKPOINT_CHOICES})
    """Which checkpoint_NAME.pt of each fold (an nnU-Net v2 model folder has final and best)."""
    step: float = 0.5
    """Distance between neighbouring tiles as a fraction of the patch, in (0, 1]; smaller steps overlap the
    tiles more (slower, slightly smoother)."""
    tile_batch: int = 4
    """Tiles per forward pass, times the mirrored copies; fewer are taken when the memory free does not hold
    them, and halved again after an out-of-memory error (the result is the same)."""
    mirror_axes: tuple[int, ...] | str = "all"
    """Test-time mirroring: all (every spatial axis the model allows: the plan's inference_mirror_axes,
    else every axis), none, or spatial axes such as 0,1,2; every combination of flips is averaged."""
    amp: str = field(default="auto", metadata={"choices": AMP_CHOICES})
    """Mixed precision: auto (bf16 where the GPU supports it, else fp16; float32 on a CPU), bf16, fp16 (CUDA
    only) or off."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N; onnxruntime runs on the CPU."""
    cpu_forward: str = field(default="auto", metadata={"choices": ("auto",) + CPU_FORWARD_VARIANTS})
    """How a CPU runs the network: auto = the fastest variant the precision allows (float32: fp32 or fp32-cl,
    channels-last; --amp bf16: bf16-cl), measured once per model and machine and kept in
    ~/.cache/voxseg/cpu_forward.json; or one variant by name, whose precision then holds."""
    backend: str = field(default="auto", metadata={"choices": BACKENDS})
    """torch, or onnxruntime: run ONNX files (onnx_files, else each fold's exported
    training/fold_F/model.onnx) on the CPU; auto = onnxruntime when onnx_files are given, else torch."""
    onnx_files: list[str] | None = None
    """ONNX files (from 'voxseg export --onnx FILE') to run with onnxruntime instead of the folds' networks;
    several are averaged as an ensemble. The model folder still gives postprocessing.json."""
    compile: bool = False
    """torch.compile the networks (pays off over many cases)."""
    save_probabilities: bool = False
    """Also write OUT/CASE.npz with the probabilities (float16, on the input grid)."""
    postprocess: bool | None = None
    """Largest-component postprocessing: none = the model's postprocessing.json, if any; true = of every
    class; false = none, even where the model has a postprocessing.json."""
    file_ending: str | None = None
    """File ending of the written label maps (.nii.gz, .nii, .mha, .mhd, .nrrd, .nhdr); none = the plan's."""
    output_format: str = field(default="nifti", metadata={"choices": OUTPUT_FORMATS})
    """nifti: a label map image per case, OUT/CASE{file ending}; dicom-seg: a DICOM Segmentation per case,
    OUT/CASE.dcm, one binary segment per label; rtstruct: an RT Structure Set per case, OUT/CASE.dcm, one ROI of
    contours per label; both reference the case's source series (DICOM input only)."""
    max_memory: float | None = None
    """Host memory in GB one case's prediction may take at its peak; none = 85% of what is available when the
    case starts. The restore slab and the tiles per forward pass are fitted into it, and a case that cannot
    fit is refused before any work, with the numbers (docs/INFERENCE.md, "Memory")."""

    def __post_init__(self) -> None:
        self._normalise()
        check_tiling(self.step, self.tile_batch)
        check_choice(self, "checkpoint")
        check_choice(self, "amp")
        check_choice(self, "backend")
        check_choice(self, "cpu_forward")
        check_choice(self, "output_format")
        if not is_device_name(self.device):
            raise ConfigError(f"device='{self.device}' is not allowed; use auto, cpu, cuda or cuda:N")
        if isinstance(self.mirror_axes, str) and self.mirror_axes not in MIRROR_WORDS:
            raise ConfigError(f"mirror_axes='{self.mirror_axes}' is not allowed; use all, none or spatial axes "
                              "such as 0,1,2")
        if self.onnx_files and self.backend == "torch":
            raise ConfigError("--onnx-model runs ONNX files with onnxruntime (onnx_files: backend onnxruntime); "
                              "drop '--backend torch' or use --backend onnxruntime")
        if self.file_ending is not None and self.file_ending not in SUPPORTED_ENDINGS:
            raise ConfigError(f"file_ending='{self.file_ending}' cannot be written; use one of "
                              f"{', '.join(SUPPORTED_ENDINGS)}")
        if self.file_ending is not None and self.output_format != "nifti":
            raise ConfigError(f"file_ending='{self.file_ending}' is the ending of label map files; output_format="
                              f"'{self.output_format}' writes OUT/CASE.dcm: drop --file-ending or write "
                              "--output-format nifti")
        for name in ("compile", "save_probabilities"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: give true or false")
        if self.max_memory is not None and (isinstance(self.max_memory, bool) or
                                            not isinstance(self.max_memory, (int, float)) or
                                            not 0 < self.max_memory < float("inf")):
            raise ConfigError(f"max_memory={self.max_memory!r}: give the memory one case may take in GB, e.g. 4 "
                              "(predict --max-memory), or none for 85% of what is available")
        if self.postprocess not in (None, True, False):
            raise ConfigError(f"postprocess={self.postprocess!r}: give none (the model's), true or false")

    def _normalise(self) -> None:
        """The spellings of the keyword API (`Predictor.from_workdir(..., mirror_axes=None, amp=False)`) and of
        Python values (a torch.device, a Path, one fold as an int) in the field's own form."""
        if self.mirror_axes is None or isinstance(self.mirror_axes, bool):
            self.mirror_axes = "all" if self.mirror_axes else "none"
        elif not isinstance(self.mirror_axes, str):
            self.mirror_axes = tuple(_axis(a) for a in self.mirror_axes)
        if self.amp is None or isinstance(self.amp, bool):
            self.amp = "off" if self.amp is False else "auto"
        if isinstance(self.device, torch.device):
            self.device = str(self.device)
        if isinstance(self.onnx_files, (str, Path)):
            self.onnx_files = [self.onnx_files]
        if self.onnx_files is not None:
            self.onnx_files = [str(path) for path in self.onnx_files]
        self.folds = _folds(self.folds)

    # ----- resolved for a model and a device ----------------------------------------------------------------
    def resolved_backend(self) -> str:
        """torch or onnxruntime ("auto": onnxruntime when ONNX files are given)."""
        if self.backend != "auto":
            return self.backend
        return "onnxruntime" if self.onnx_files else "torch"

    def resolved_mirror_axes(self, plan: Plan) -> tuple[int, ...]:
        """The spatial axes mirrored for `plan`'s network: "all" is the plan's `inference_mirror_axes` (the axes
        the model was trained to be mirror-invariant along) when it has them, else every axis."""
        ndim = plan.network.ndim
        if self.mirror_axes == "none":
            return ()
        if self.mirror_axes == "all":
            allowed = plan.inference_mirror_axes
            return tuple(int(a) for a in allowed) if allowed is not None else tuple(range(ndim))
        axes = tuple(self.mirror_axes)
        bad = [a for a in axes if not 0 <= a < ndim]
        if bad:
            raise ConfigError(f"mirror axes {bad} do not exist: the network has {ndim} spatial axes "
                              f"(0..{ndim - 1}); give --mirror-axes within them")
        return axes

    def tiling(self, plan: Plan, device: str | torch.device) -> "Tiling":
        """The sliding-window settings of `plan`'s network on `device`: mirror axes and autocast resolved."""
        device = torch.device(device)
        return Tiling(self.step, self.tile_batch, self.resolved_mirror_axes(plan), resolve_amp(self.amp, device, "amp"))

    # ----- copies ---------------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "InferConfig":
        """A copy with some fields changed (validated); unknown names are refused with the nearest one."""
        return replace_fields(self, "inference option", **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Tiling:
    """One sliding-window pass's settings, resolved for a network on a device (`InferConfig.tiling` makes it
    from the config; `sliding_window_inference` takes it)."""

    step: float
    """Distance between neighbouring tiles as a fraction of the patch, in (0, 1]."""
    tile_batch: int
    """Tiles per forward pass (times the mirrored copies)."""
    mirror_axes: tuple[int, ...] = ()
    """Spatial axes (of the patch) mirrored for test-time augmentation; every combination is evaluated."""
    amp_dtype: torch.dtype | None = None
    """Autocast dtype (torch.bfloat16 / torch.float16), or None for float32."""
    use_gaussian: bool = True
    """Blend the tiles with a Gaussian importance map (else a flat average)."""
    accumulator_device: str | torch.device | None = None
    """Where the logits are summed; None: the compute device when they fit in its free memory, else the host."""
    max_forward_batch: int | None = None
    """The most tiles (mirrored copies included) one forward call may hold; None: tile_batch x mirrors. Set per
    case from the memory free (`voxseg.infer.budget.forward_limit`)."""

    def __post_init__(self) -> None:
        check_tiling(self.step, self.tile_batch)
        object.__setattr__(self, "mirror_axes", tuple(int(a) for a in self.mirror_axes))

    @classmethod
    def default(cls, **changes: Any) -> "Tiling":
        """InferConfig's tile step and tile batch, no mirroring, float32, then `changes`, e.g.
        `Tiling.default(tile_batch=8, mirror_axes=(0, 1, 2))`: what `sliding_window_inference` runs without one."""
        defaults = InferConfig()
        return cls(**{"step": defaults.step, "tile_batch": defaults.tile_batch, **changes})


def check_tiling(step: float, tile_batch: int) -> None:
    """ConfigError naming the option for a tile step outside (0, 1] or a tile batch below 1."""
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0.0 < step <= 1.0:
        raise ConfigError(f"step={step!r}: the tile step is a fraction of the patch in (0, 1], e.g. 0.5 "
                          "(predict --step); smaller steps overlap the tiles more")
    if isinstance(tile_batch, bool) or not isinstance(tile_batch, int) or tile_batch < 1:
        raise ConfigError(f"tile_batch={tile_batch!r}: the number of tiles per forward pass must be an integer >= 1 "
                          "(predict --tile-batch)")


def infer_config(overrides: Sequence[str] = (), base: InferConfig | None = None) -> InferConfig:
    """`base` (default InferConfig()) with `name=value` overrides applied, parsed by each field's type as
    `voxseg train --set` parses them (lists as 0,1,2 or JSON, none for None), and validated."""
    data = (base or InferConfig()).to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"inference option '{item}' must look like name=value, e.g. step=0.25")
        hint, parent, leaf = locate_option(InferConfig, key.strip(), data)
        parent[leaf] = parse_value(text.strip(), hint, key.strip())
    return build_dataclass(InferConfig, data)


def _axis(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
        raise ConfigError(f"mirror_axes: '{value}' is not a spatial axis; give all, none or axes such as 0,1,2")
    return int(value)


def _folds(folds: Any) -> list[int | str] | str | None:
    """None, "all", or a list of fold numbers (and "all" for fold_all) from an int, a list or their text."""
    if folds is None or folds == "all":
        return folds
    items = [folds] if isinstance(folds, (int, str)) else list(folds)
    out: list[int | str] = []
    for fold in items:
        text = str(fold)
        if isinstance(fold, bool) or not (text == "all" or text.isdigit()):
            raise ConfigError(f"folds: '{fold}' is not a fold number or 'all' (predict --folds 0, 0,1,2 or all)")
        out.append("all" if text == "all" else int(text))
    if not out:
        raise ConfigError("folds is empty; give at least one fold (predict --folds 0, 0,1,2 or all)")
    return out
