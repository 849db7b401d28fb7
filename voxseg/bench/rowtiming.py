"""Timing the configurations `voxseg estimate` compares: short, repeated, comparable measurements.

Each configuration ("setting": batch size, patches per case, patch size) gets its own training, built as
`voxseg train` builds it but on a few cases (`TIMING_CASES`): a step's cost does not depend on how many cases
the sampler draws from, and loading a whole dataset for every row was most of the old command's time. The
cache mode is the one the whole dataset would get (see `voxseg.bench.estimate`), so the data path is the
training's. After `warmup` steps (compilation, cuDNN autotuning, allocator growth), a *round* times
`iterations` end-to-end training steps and `val_batches` validation batches; every setting is timed in
`rounds` rounds and the estimate works with the per-round figures (median and spread).

Two schedules:
- interleaved (a CPU without compilation): all settings are built first, then the rounds go A B C, C B A,
  A B C, ... so that load from other processes and clock drift hit every setting alike, and a ratio taken
  within one round cancels them;
- in sequence (CUDA, or whenever compiling): one setting at a time, so that its memory is measured alone and
  it is compiled fresh: `Compiler.reset()` clears Dynamo's caches before the setting is built, so no setting
  reuses code compiled for another's shapes (or, past Dynamo's recompile limit, silently runs eager). The
  number of graphs compiled during each setting's warm-up is recorded; zero while compiling is reported.

`measure_settings` takes the function that opens a setting's row and the compiler as arguments: tests drive
it with scripted rows and a recording compiler, nothing is timed or compiled there.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from voxseg.bench.timing import gpu_peak_memory_gb, is_out_of_memory, sync
from voxseg.config import TrainConfig, apply_overrides

TIMING_CASES = 4
"""Cases each setting's training is built on (the sampler draws with replacement; crops cost the same)."""


@dataclass(frozen=True)
class Setting:
    """One configuration to time."""

    batch_size: int
    num_samples: int
    patch_size: tuple[int, ...]

    def describe(self) -> str:
        patches = "patch" if self.num_samples == 1 else "patches"
        return f"batch {self.batch_size}, {self.num_samples} {patches}/case, {'x'.join(map(str, self.patch_size))}"


@dataclass
class Measured:
    """What timing one setting gave: one figure per round (seconds), or why there is none."""

    step_s: list[float] = field(default_factory=list)
    """Seconds per end-to-end training step, one value per round."""
    val_batch_s: list[float] = field(default_factory=list)
    """Seconds per validation batch, one value per round (empty without validation)."""
    memory_gb: float | None = None
    """CUDA: the setting's peak reserved memory after warm-up + context, its data cache left out (the quantity
    the planner's estimate models). None on a CPU, where the process's peak RSS mixes all settings."""
    compiled_graphs: int | None = None
    """Graphs Dynamo compiled during the warm-up; None when not compiling."""
    warmup_s: float = 0.0
    fits: bool = True
    note: str = ""


@dataclass(frozen=True)
class Schedule:
    """How much to time: the smallest amount that gives a stable ratio on a quiet machine."""

    warmup: int = 2
    iterations: int = 3
    rounds: int = 5
    val_batches: int = 1


class Row(Protocol):
    """One setting's training, ready to be timed."""

    def warm_up(self) -> None: ...

    def time_round(self) -> tuple[float, float | None]:
        """(seconds per training step, seconds per validation batch or None)."""
        ...

    def memory_gb(self) -> float | None: ...

    def close(self) -> None: ...


class Compiler:
    """How each setting is compiled: `reset()` clears Dynamo's caches, `compile(fn)` is torch.compile, and
    `graphs()` counts the graphs compiled so far in this process."""

    def reset(self) -> None:
        torch._dynamo.reset()

    def compile(self, function: Callable) -> Callable:
        return torch.compile(function)

    def graphs(self) -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"].get("unique_graphs", 0))


OpenRow = Callable[[Setting, "Compiler | None"], Row]


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _attempt(result: Measured, action: Callable[[], Any]) -> Any:
    """`action()`; out of memory marks the setting as not fitting (and returns None), anything else is raised."""
    try:
        return action()
    except Exception as exc:  # noqa: BLE001 - out of memory is an answer here; anything else is re-raised
        if not is_out_of_memory(exc):
            raise
        result.fits, result.note = False, "does not fit (out of memory)"
        result.step_s.clear()
        result.val_batch_s.clear()
        free_device_memory()
        return None


def _record(result: Measured, figures: tuple[float, float | None]) -> None:
    step_s, val_s = figures
    result.step_s.append(step_s)
    if val_s is not None:
        result.val_batch_s.append(val_s)


def _warm(row: Row, result: Measured) -> bool:
    start = time.perf_counter()
    done = _attempt(result, lambda: row.warm_up() or True)
    result.warmup_s = time.perf_counter() - start
    return bool(done)


def measure_settings(settings: Sequence[Setting], open_row: OpenRow, rounds: int, interleave: bool,
                     compiler: Compiler | None = None) -> list[Measured]:
    """Time every setting in `rounds` rounds, interleaved or one after another (see the module docstring).

    `compiler` is used (reset before each setting, handed to `open_row`) only in sequence.
    """
    if interleave:
        return _interleaved(settings, open_row, rounds)
    return [_alone(setting, open_row, rounds, compiler) for setting in settings]


def _alone(setting: Setting, open_row: OpenRow, rounds: int, compiler: Compiler | None) -> Measured:
    result = Measured()
    if compiler is not None:
        compiler.reset()  # nothing compiled for an earlier setting is reused or counts against a limit
    graphs_before = compiler.graphs() if compiler is not None else 0
    row = _attempt(result, lambda: open_row(setting, compiler))
    if row is None:
        return result
    try:
        if not _warm(row, result):
            return result
        if compiler is not None:
            result.compiled_graphs = compiler.graphs() - graphs_before
            if result.compiled_graphs == 0:
                result.note = "nothing was compiled: this row ran eager"
        for _ in range(rounds):
            figures = _attempt(result, row.time_round)
            if figures is None:
                return result
            _record(result, figures)
        result.memory_gb = row.memory_gb()
        return result
    finally:
        row.close()
        free_device_memory()


def _interleaved(settings: Sequence[Setting], open_row: OpenRow, rounds: int) -> list[Measured]:
    results = [Measured() for _ in settings]
    rows: dict[int, Row] = {}
    try:
        for index, setting in enumerate(settings):
            row = _attempt(results[index], lambda setting=setting: open_row(setting, None))
            if row is not None and _warm(row, results[index]):
                rows[index] = row
            elif row is not None:
                row.close()
        for round_index in range(rounds):
            order = sorted(rows, reverse=round_index % 2 == 1)  # A B C, C B A, ...: drift hits all alike
            for index in order:
                figures = _attempt(results[index], rows[index].time_round)
                if figures is None:
                    rows.pop(index).close()
                else:
                    _record(results[index], figures)
        for index, row in rows.items():
            results[index].memory_gb = row.memory_gb()
    finally:
        for row in rows.values():
            row.close()
        free_device_memory()
    return results


# ----- the real thing: one setting's training -----------------------------------------------------------------
class TrainingRow:
    """A setting's training as `voxseg train` builds it, on `cases`, with `cache_mode` (see the module docstring).

    Args:
        workdir: the work directory (plans.json, preprocessed/).
        setting: batch, patches per case and patch size (plan and data overrides).
        config: the training config every setting starts from (device, threads, the user's overrides).
        cases: the cases to build on; validation batches are cut from the same cases (unaugmented).
        cache_mode: the data cache mode the whole dataset would get.
        schedule: warm-up steps, steps and validation batches per round.
        compiler: compiles the step when given (the caller gives one when the run compiles).
    """

    def __init__(self, workdir: Path, setting: Setting, config: TrainConfig, cases: list[str], cache_mode: str,
                 schedule: Schedule, compiler: Compiler | None = None) -> None:
        from voxseg.train.loop import build_training, effective_plan, resolve, seed_everything

        config = apply_overrides(copy.deepcopy(config), [
            f"plan.batch_size={setting.batch_size}", f"data.num_samples={setting.num_samples}",
            "plan.patch_size=" + ",".join(map(str, setting.patch_size)), f"data.cache={cache_mode}"])
        plan = effective_plan(workdir, config)
        setup = resolve(config, plan, len(cases))
        seed_everything(config.loop.seed, False, config.data.num_threads)
        self.device, self.amp_dtype, self.schedule, self.plan = setup.device, setup.amp_dtype, schedule, plan
        free_device_memory()
        self.reserved_before = torch.cuda.memory_reserved(self.device) if self.device.type == "cuda" else 0
        validate = schedule.val_batches > 0
        # compiled here, not by TrainStep, so that the caller decides what each setting's compilation starts from
        self.training: Any = build_training(workdir, plan, config, dataclasses.replace(setup, compile=False), cases,
                                            cases if validate else [])
        if compiler is not None:
            self.training.step.compile_with(compiler.compile)

    def _steps(self, count: int) -> None:
        for batch in self.training.data.train_stream(count):
            self.training.step(*batch)

    def _validate(self) -> None:
        from voxseg.train.validate import pseudo_dice

        training = self.training
        pseudo_dice(training.model, training.data.val_batches(self.schedule.val_batches), self.plan, training.loss_fn,
                    self.amp_dtype)

    def warm_up(self) -> None:
        self._steps(self.schedule.warmup)
        if self.schedule.val_batches:
            self._validate()
        sync(self.device)
        if self.device.type == "cuda":  # the steady state's peak, not compilation's or autotuning's
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def time_round(self) -> tuple[float, float | None]:
        sync(self.device)
        start = time.perf_counter()
        self._steps(self.schedule.iterations)
        sync(self.device)
        step_s = (time.perf_counter() - start) / self.schedule.iterations
        if not self.schedule.val_batches:
            return step_s, None
        start = time.perf_counter()
        self._validate()  # ends with a host read: synchronised
        return step_s, (time.perf_counter() - start) / self.schedule.val_batches

    def memory_gb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        cache = self.training.data.train_cache
        cache_bytes = cache.nbytes if cache.mode == "gpu" else 0
        free, total = torch.cuda.mem_get_info(self.device)
        own_peak = torch.cuda.max_memory_reserved(self.device) - self.reserved_before - cache_bytes
        return gpu_peak_memory_gb(max(0, own_peak), total, free, torch.cuda.memory_reserved(self.device))

    def close(self) -> None:
        self.training = None  # the model, optimiser and cache go with it
