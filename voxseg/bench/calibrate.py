"""Calibrate the planner's memory model on the GPU it will train on (`voxseg plan --calibrate`).

`voxseg.data.memory` estimates the peak memory of a training step from counted activations and constants set
for one reference point. On a given GPU (and torch / cuDNN version) the real peak differs: allocator rounding,
workspace sizes and kernels change with the device. Calibration runs a few real training steps of candidate
configurations of the plan's network on the CUDA device and fits two numbers to the measured peaks:

    measured_gb  ~=  scale x variable_gb + fixed_gb

where `variable_gb` is the model's size-dependent part (activations, loss tensors, parameter state) and
`fixed_gb` what does not grow with patch or batch (CUDA context, workspaces). The planner keeps its model and
is handed the budget that makes the calibrated estimate fit the real one:

    scale x variable + fixed <= budget   <=>   variable + model_fixed <= (budget - fixed) / scale + model_fixed

so patch and batch are chosen for this GPU without the planner knowing anything about measurement. The fit, its
points and the device name are stored in plans.json (`memory_calibration`). Without a CUDA device nothing is
measured and the formula is used as it is (the CLI says so).

Example: the model says 7.3 GiB for 128^3 x 2 (variable 6.3, fixed 1.0); measured peaks 6.1 / 3.4 GiB at batch 2 /
1 give scale 0.86, fixed 0.69 -> an 8 GiB budget plans as if it were (8 - 0.69) / 0.86 + 1.0 = 9.5 GiB.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from voxseg.bench.timing import is_out_of_memory
from voxseg.data.memory import estimate_memory_breakdown
from voxseg.errors import ConfigError, VoxsegError
from voxseg.plans import Plan
from voxseg.workdir import WorkDir

MIN_SCALE = 0.2  # a fitted scale outside [MIN_SCALE, MAX_SCALE] means the measurements are not usable
MAX_SCALE = 5.0
Measure = Callable[[Plan], float]  # peak memory (GiB, context included) of real steps with a plan's patch/batch


class CalibrationError(VoxsegError):
    """The memory model could not be calibrated (no usable measurement)."""


@dataclass
class MemoryCalibration:
    """The fitted memory model of one device: measured ~= scale x variable + fixed (GiB)."""

    device: str
    scale: float
    fixed_gb: float
    model_fixed_gb: float
    points: list[dict[str, Any]] = field(default_factory=list)

    def estimate_gb(self, plan: Plan) -> float:
        """The calibrated peak memory estimate of the plan's patch and batch."""
        terms = _terms(plan)
        return self.scale * (terms["total"] - terms["fixed"]) + self.fixed_gb

    def effective_budget(self, budget_gb: float) -> float:
        """The budget to hand the uncalibrated planner so that its choice fits `budget_gb` on this device."""
        if budget_gb <= self.fixed_gb:
            raise ConfigError(
                f"gpu_memory_gb={budget_gb:g}: on {self.device} the fixed memory alone is {self.fixed_gb:.2f} GiB "
                "(measured); plan for more memory"
            )
        return (budget_gb - self.fixed_gb) / self.scale + self.model_fixed_gb

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemoryCalibration":
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"plans.json: memory_calibration is not a calibration record ({exc})") from None


def _terms(plan: Plan) -> dict[str, float]:
    return estimate_memory_breakdown(plan.network, plan.patch_size, plan.batch_size, plan.num_channels,
                                     plan.num_outputs)


def candidate_plans(plan: Plan) -> list[Plan]:
    """Configurations of the plan's network to measure: the plan, a smaller batch, a smaller patch.

    Different sizes give the fit its slope; all stay at or below the plan's own size, which the model says fits.
    """
    stride = plan.network.total_stride
    smaller_patch = [max(t, (int(p * 0.75) // t) * t) for p, t in zip(plan.patch_size, stride)]
    candidates = [plan]
    if plan.batch_size > 1:
        candidates.append(dataclasses.replace(plan, batch_size=max(1, plan.batch_size // 2)))
    if smaller_patch != list(plan.patch_size):
        candidates.append(dataclasses.replace(plan, patch_size=smaller_patch))
    if plan.batch_size == 1 and smaller_patch != list(plan.patch_size):
        even_smaller = [max(t, (int(p * 0.5) // t) * t) for p, t in zip(plan.patch_size, stride)]
        if even_smaller not in (smaller_patch, list(plan.patch_size)):
            candidates.append(dataclasses.replace(plan, patch_size=even_smaller))
    return candidates


def fit_calibration(points: Sequence[dict[str, Any]], model_fixed_gb: float, device: str) -> MemoryCalibration:
    """Least-squares fit of measured = scale x variable + fixed over points {"variable_gb", "measured_gb", ...}.

    One usable point (or points of one size) fixes the scale with the model's own fixed part.
    """
    usable = [p for p in points if p.get("measured_gb") is not None]
    if not usable:
        raise CalibrationError("no candidate configuration could be measured (all ran out of memory or failed)")
    xs = [float(p["variable_gb"]) for p in usable]
    ys = [float(p["measured_gb"]) for p in usable]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    scale = fixed = math.nan
    if len(usable) >= 2 and sxx > 1e-9 * max(1.0, mean_x ** 2):
        scale = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
        fixed = mean_y - scale * mean_x
    if not (MIN_SCALE <= scale <= MAX_SCALE) or fixed < 0:  # one size only, or a fit the points do not support
        fixed = model_fixed_gb
        scale = sum(y - fixed for y in ys) / sum(xs)
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise CalibrationError(
            f"the measured peaks ({', '.join(f'{y:.2f}' for y in ys)} GiB) are {scale:.2f}x what the memory model "
            "predicts: too far off to calibrate; check that nothing else runs on the GPU"
        )
    return MemoryCalibration(device=device, scale=round(scale, 4), fixed_gb=round(fixed, 4),
                             model_fixed_gb=model_fixed_gb, points=list(points))


def calibrate(plan: Plan, measure: Measure, device: str) -> MemoryCalibration:
    """Measure the candidate configurations of `plan` with `measure` and fit the memory model to them.

    A candidate that runs out of memory is recorded as such and left out of the fit.
    """
    points = []
    model_fixed = _terms(plan)["fixed"]
    for candidate in candidate_plans(plan):
        terms = _terms(candidate)
        point: dict[str, Any] = {"patch_size": list(candidate.patch_size), "batch_size": candidate.batch_size,
                                 "variable_gb": round(terms["total"] - terms["fixed"], 4),
                                 "model_gb": round(terms["total"], 4), "measured_gb": None}
        try:
            point["measured_gb"] = round(float(measure(candidate)), 4)
        except Exception as exc:  # noqa: BLE001 - out of memory is a result here; anything else is re-raised
            if not is_out_of_memory(exc):
                raise
            point["note"] = "out of memory"
        points.append(point)
    return fit_calibration(points, model_fixed, device)


def cuda_measure(device: Any = "cuda", steps: int = 2, warmup: int = 1) -> Measure:
    """A Measure running real bf16 training steps on a CUDA device: the allocator's peak reserved memory over
    `steps` steps after `warmup` (cuDNN autotuning's trial workspaces are a one-off, left out) + the context,
    the same quantity `voxseg benchmark` compares with the estimate (`timing.gpu_peak_memory_gb`)."""
    import torch

    from voxseg.bench.timing import cuda_context_gb
    from voxseg.models.measure import measure_peak_memory_gb

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise CalibrationError(f"calibration needs a CUDA device; '{device}' is not one")

    def measure(candidate: Plan) -> float:
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        context = cuda_context_gb(total, free, torch.cuda.memory_reserved(dev))
        peak = measure_peak_memory_gb(candidate, device=dev, steps=steps, reserved=True, warmup=warmup)
        torch.cuda.empty_cache()
        return peak + context

    return measure


def device_name(device: Any = "cuda") -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device))


def describe_calibration(calibration: MemoryCalibration) -> str:
    """Lines for the CLI: each measured point against the model, and the fit."""
    lines = [f"memory calibrated on {calibration.device}: measured ~= {calibration.scale:.3f} x model "
             f"+ {calibration.fixed_gb:.2f} GiB"]
    for p in calibration.points:
        size = "x".join(str(s) for s in p["patch_size"]) + f" x {p['batch_size']}"
        measured = f"{p['measured_gb']:.2f}" if p.get("measured_gb") is not None else p.get("note", "-")
        lines.append(f"  {size:<20} model {p['model_gb']:.2f} GiB, measured {measured}")
    return "\n".join(lines)


def calibrate_workdir(workdir: Any, measure: Measure, device: str, overrides: dict[str, Any] | None = None,
                      dims: int = 3, cube_patch: bool = False) -> tuple[Plan, MemoryCalibration]:
    """Calibrate WORKDIR/plans.json on a device and plan again with the calibrated memory model.

    The plan is made anew from WORKDIR/fingerprint.json with the budget that makes the calibrated estimate fit
    the plan's `gpu_memory_gb`; it records that budget, the calibrated estimate and the calibration itself, and
    replaces plans.json (atomically) only when everything succeeded.
    """
    from pathlib import Path

    from voxseg.data.dataset import load_dataset
    from voxseg.data.fingerprint import load_fingerprint
    from voxseg.data.plan import make_plan

    workdir = Path(workdir)
    plan = Plan.load(WorkDir(workdir).plans)
    if plan.network.ndim != 3:
        raise ConfigError("memory calibration is for 3D plans; this work directory holds a 2D plan")
    calibration = calibrate(plan, measure, device)
    budget = plan.gpu_memory_gb
    values = {k: v for k, v in (overrides or {}).items() if k != "gpu_memory_gb"}
    fingerprint = load_fingerprint(WorkDir(workdir).fingerprint)
    new = make_plan(fingerprint, load_dataset(plan.raw_dataset), gpu_memory_gb=calibration.effective_budget(budget),
                    overrides=values, dims=dims, cube_patch=cube_patch)
    new.gpu_memory_gb = budget
    new.estimated_memory_gb = round(calibration.estimate_gb(new), 3)
    new.memory_calibration = calibration.to_dict()
    new.save(WorkDir(workdir).plans)
    return new, calibration
