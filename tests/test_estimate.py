"""`voxseg estimate`: the table's arithmetic, anchoring, --cases scaling, uncertainty, noise note and contradiction
warnings with scripted timings whose results are known (nothing timed here), the interleaved and compile-fresh
schedules, and one real run of every piece on a tiny work directory."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import pytest
import torch

from voxseg.bench.estimate import EstimateRequest, run_estimate
from voxseg.bench.estimate_table import format_estimate, total_unit
from voxseg.bench.projection import EpochShape, epoch_iterations
from voxseg.bench.rowtiming import Compiler, Measured, Schedule, Setting, TrainingRow, measure_settings
from voxseg.data.plan import plan_dataset
from voxseg.data.preprocess import preprocess_dataset
from voxseg.data.synth import make_synthetic_dataset
from voxseg.errors import ConfigError
from voxseg.units import GIB

PATCH = (16, 16, 16)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("estimate")
    dataset = make_synthetic_dataset(root / "Dataset001_Tiny", num_cases=6, shape=(24, 24, 28), seed=1)
    overrides = {"patch_size": list(PATCH), "batch_size": 2, "network.features": [4, 8, 8]}
    plan_dataset(dataset, root / "work", overrides=overrides, num_folds=3)
    preprocess_dataset(root / "work", progress=False)
    return root / "work"


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class Script:
    """Scripted rows: per (batch, patches/case, patch) the seconds each round returns, and a log of the calls."""

    def __init__(self, steps: dict[tuple, list[float]], vals: dict[tuple, list[float]] | None = None,
                 memory: dict[tuple, float] | None = None, oom: set[tuple] = frozenset()) -> None:
        self.steps, self.vals, self.memory, self.oom = steps, vals or {}, memory or {}, oom
        self.log: list[tuple] = []

    def open_row(self, setting: Setting, compiler: Compiler | None) -> "ScriptedRow":
        key = (setting.batch_size, setting.num_samples)
        self.log.append(("open", key, compiler))
        if key in self.oom:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {key[0]} GiB")
        return ScriptedRow(self, key)


class ScriptedRow:
    def __init__(self, script: Script, key: tuple) -> None:
        self.script, self.key, self.round = script, key, 0

    def warm_up(self) -> None:
        self.script.log.append(("warm", self.key))

    def time_round(self) -> tuple[float, float | None]:
        self.script.log.append(("round", self.key))
        steps, vals = self.script.steps[self.key], self.script.vals.get(self.key)
        figures = steps[self.round % len(steps)], (vals[self.round % len(vals)] if vals else None)
        self.round += 1
        return figures

    def memory_gb(self) -> float | None:
        return self.script.memory.get(self.key)

    def close(self) -> None:
        self.script.log.append(("close", self.key))


def _estimate(workdir: Path, tmp_path: Path, script: Script, **request) -> dict:
    request.setdefault("device", "cpu")
    schedule = request.pop("schedule", Schedule(warmup=1, iterations=1, rounds=3))
    compiler = request.pop("compiler", None)
    return run_estimate(workdir, EstimateRequest(schedule=schedule, **request), output=tmp_path / "e.json",
                        open_row=script.open_row, compiler=compiler)


def _rows(result: dict) -> dict[tuple, dict]:
    return {(r["batch_size"], r["num_samples"], r["epochs"]): r for r in result["rows"]}


# ----- arithmetic ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fixed", "cases", "samples", "batch", "expected"),
    [(250, 100, 1, 2, 250), (0, 6, 1, 2, 3), (0, 7, 1, 2, 4), (0, 6, 2, 4, 3), (0, 5, 2, 4, 3), (0, 1, 1, 8, 1),
     (0, 0, 1, 2, 1), (1, 1000, 4, 2, 1), (0, 329, 1, 2, 165), (0, 329, 2, 4, 165)],
)
def test_epoch_iterations(fixed: int, cases: int, samples: int, batch: int, expected: int) -> None:
    assert epoch_iterations(fixed, cases, samples, batch) == expected


def test_epoch_seconds_include_validation() -> None:
    shape = EpochShape(250, 329, val_iterations=50, val_freq=2)
    assert shape.epoch_s(Setting(2, 1, PATCH), 0.2, 0.06) == pytest.approx(250 * 0.2 + 25 * 0.06)


def test_fixed_iterations_anchored_to_the_current_run(workdir: Path, tmp_path: Path) -> None:
    """The projection module's worked example: 250 iterations, 50 validation batches, anchored at 302 s."""
    script = Script({(2, 1): [0.2], (4, 1): [0.38]}, vals={(2, 1): [0.06], (4, 1): [0.11]})
    result = _estimate(workdir, tmp_path, script, batch_sizes=[2, 4], epochs=[1000, 500], cases=329,
                       current_epoch_s=302.0)
    rows = _rows(result)
    assert [(r["index"], r["batch_size"], r["epochs"], r["baseline"]) for r in result["rows"]] == [
        (1, 2, 1000, True), (2, 2, 500, False), (3, 4, 1000, False), (4, 4, 500, False)]
    assert result["num_cases"] == 329 and result["cases_from"] == "--cases"
    base, half, batch4 = rows[2, 1, 1000], rows[2, 1, 500], rows[4, 1, 1000]
    assert base["epoch_s"] == pytest.approx(302.0) and base["total_s"] == pytest.approx(302_000)
    assert half["total_s"] == pytest.approx(151_000) and half["speedup"] == pytest.approx([2.0, 2.0, 2.0])
    assert batch4["iterations_per_epoch"] == 250
    assert batch4["epoch_s"] == pytest.approx(302 * 100.5 / 53)  # (250 x 0.38 + 50 x 0.11) / (250 x 0.2 + 50 x 0.06)
    assert batch4["total_s"] == pytest.approx(1000 * 302 * 100.5 / 53)
    assert batch4["speedup"] == pytest.approx([53 / 100.5] * 3)
    assert batch4["per_sample"] == pytest.approx([(4 / 0.38) / (2 / 0.2)] * 3)  # 1.05x
    assert base["step_ms"] == pytest.approx(200.0) and batch4["step_ms"] == pytest.approx(380.0)

    table = format_estimate(result)
    assert "total d" in table and " h " not in table and "min" not in table.split("\n\n")[1]  # one unit: days
    assert "your run takes 302 s per epoch" in table and "329 training cases (--cases)" in table
    lines = {line.split()[0]: line for line in table.splitlines() if line.strip().startswith("#") and "x" in line}
    assert "1.00x (baseline)" in lines["#1"] and "3.50" in lines["#1"]  # 302 s x 1000 epochs = 3.50 days
    assert "0.53x (0.53-0.53)" in lines["#3"] and "1.05x (1.05-1.05)" in lines["#3"] and "6.63" in lines["#3"]
    assert "2.00x (2.00-2.00)" in lines["#2"] and "1.75" in lines["#2"]
    assert not result["notes"] and not result["warnings"] and "WARNING" not in table and "NOTE" not in table


def test_one_pass_epochs_follow_cases(workdir: Path, tmp_path: Path) -> None:
    """--cases with --iterations-per-epoch 0: iterations = ceil(cases x patches / batch); unanchored = here."""
    script = Script({(2, 1): [0.1], (2, 2): [0.1], (4, 1): [0.2], (4, 2): [0.2]})
    result = _estimate(workdir, tmp_path, script, batch_sizes=[2, 4], num_samples=[1, 2], cases=329,
                       iterations_per_epoch=0, epochs=[100], overrides=["loop.val_iterations=0"])
    rows = _rows(result)
    assert rows[2, 1, 100]["iterations_per_epoch"] == 165 and rows[2, 2, 100]["iterations_per_epoch"] == 329
    assert rows[4, 2, 100]["iterations_per_epoch"] == 165
    assert rows[2, 1, 100]["epoch_s"] == pytest.approx(16.5) and rows[2, 1, 100]["total_s"] == pytest.approx(1650)
    assert rows[2, 2, 100]["speedup"] == pytest.approx([16.5 / 32.9] * 3)
    assert rows[4, 2, 100]["speedup"] == pytest.approx([16.5 / 33.0] * 3)
    assert result["schedule"]["val_batches"] == 0 and result["val_iterations"] == 0
    assert "total min" in format_estimate(result)  # 3300 s at most: minutes for the whole table


def test_total_unit_is_chosen_once_per_table() -> None:
    assert total_unit([59 * 60, 10]) == ("min", 60.0)
    assert total_unit([3600, 10]) == ("h", 3600.0)
    assert total_unit([47 * 3600]) == ("h", 3600.0)
    assert total_unit([48 * 3600, 60]) == ("d", 86400.0)


def test_default_cases_are_fold_zeros_training_cases(workdir: Path, tmp_path: Path) -> None:
    result = _estimate(workdir, tmp_path, Script({(2, 1): [0.1]}), iterations_per_epoch=0, epochs=[10])
    assert result["num_cases"] == 4 and result["cases_from"] == "fold 0 of this work directory"  # 6 cases, 3 folds
    assert result["rows"][0]["iterations_per_epoch"] == 2


# ----- uncertainty, noise, contradictions -----------------------------------------------------------------------
def test_speedups_are_median_and_range_of_paired_rounds(workdir: Path, tmp_path: Path) -> None:
    # a load that slows round 2 hits both rows alike: the paired ratios stay put while the raw times spread 90%
    script = Script({(2, 1): [0.10, 0.20, 0.11], (4, 1): [0.20, 0.40, 0.21]})
    result = _estimate(workdir, tmp_path, script, batch_sizes=[2, 4], epochs=[10],
                       overrides=["loop.val_iterations=0"])
    row = _rows(result)[4, 1, 10]
    assert row["speedup"] == pytest.approx([0.5, 0.5, 0.11 / 0.21])  # [median, min, max] of 0.5, 0.5, 0.524
    assert row["per_sample"] == pytest.approx([1.0, 1.0, 2 * 0.11 / 0.21])
    assert row["spread"] == pytest.approx((2.0 - 0.21 / 0.11) / 2.0)  # epoch ratios 2, 2, 1.91: 4.5%
    assert row["epoch_s"] == pytest.approx(250 * 0.21)  # unanchored: the median of this machine's rounds
    assert not result["notes"]
    assert "0.50x (0.50-0.52)" in format_estimate(result)


def test_noisy_machine_note_names_the_rows_and_keeps_their_ratios(workdir: Path, tmp_path: Path) -> None:
    script = Script({(2, 1): [0.1, 0.1, 0.1], (4, 1): [0.2, 0.2, 0.2], (8, 1): [0.3, 0.4, 0.5]})
    result = _estimate(workdir, tmp_path, script, batch_sizes=[2, 4, 8], epochs=[10], threads=2,
                       overrides=["loop.val_iterations=0"])
    rows = _rows(result)
    assert result["cpu_threads"] == 2
    assert rows[8, 1, 10]["spread"] == pytest.approx((5 - 3) / 4)  # epoch ratios 3, 4, 5: 50% around 4
    assert rows[4, 1, 10]["spread"] == pytest.approx(0.0)
    assert result["notes"] == [
        "this machine is too noisy for rows #3: their 3 timing rounds spread by up to 50% (more than 20%), so their "
        "ratios are uncertain; close other programs, or rerun with more --rounds or --threads 1"]
    table = format_estimate(result)
    assert "0.25x (0.20-0.33)" in table and "0.50x (0.50-0.50)" in table  # ratios printed, with their spread
    assert table.count("NOTE: this machine is too noisy for rows #3:") == 1 and "noise" not in table


def test_a_larger_batch_much_faster_per_sample_on_a_cpu_is_named_in_a_warning(workdir: Path, tmp_path: Path) -> None:
    # the reported case: batch 6 x 1 shown 1.5x faster per sample than batch 2 x 1 on a CPU
    script = Script({(2, 1): [0.30, 0.31, 0.29], (4, 1): [0.62, 0.60, 0.61], (6, 1): [0.60, 0.62, 0.58]})
    result = _estimate(workdir, tmp_path, script, batch_sizes=[2, 4, 6], epochs=[10],
                       overrides=["loop.val_iterations=0"])
    rule = "; on a CPU a larger batch does the same work per sample and can not gain more than 1.2x: one of the " \
           "two timings is wrong"
    assert result["warnings"] == [
        "row #3 (batch 6, 1 patch/case, 16x16x16) measured 1.50x (1.50-1.50) faster per sample than row #1 "
        "(batch 2, 1 patch/case, 16x16x16)" + rule,
        "row #3 (batch 6, 1 patch/case, 16x16x16) measured 1.55x (1.45-1.58) faster per sample than row #2 "
        "(batch 4, 1 patch/case, 16x16x16)" + rule]
    table = format_estimate(result)
    assert table.count("WARNING: row #3") == 2


def test_consistent_timings_give_no_warning_and_a_gpu_may_gain_from_batching() -> None:
    from voxseg.bench.plausibility import contradictions

    settings = [Setting(2, 1, PATCH), Setting(6, 1, PATCH), Setting(2, 1, (24, 24, 24))]
    measured = [Measured(step_s=[0.3] * 3), Measured(step_s=[0.6] * 3), Measured(step_s=[0.9] * 3)]
    assert contradictions(settings, measured, "cuda", [1, 2, 3]) == []  # a GPU batches: 1.5x per sample is fine
    assert len(contradictions(settings, measured, "cpu", [1, 2, 3])) == 1  # not on a CPU
    # a larger patch measured faster per step in every round: wrong on any device, named with both rows
    measured[2] = Measured(step_s=[0.2, 0.25, 0.22])
    assert contradictions(settings, measured, "cuda", [1, 3, 5]) == [
        "row #5 (batch 2, 1 patch/case, 24x24x24) does more work per step than row #1 (batch 2, 1 patch/case, "
        "16x16x16) yet measured 1.36x (1.20-1.50) faster per step: one of the two timings is wrong"]
    # within the uncertainty (one round disagrees) it is not a contradiction
    measured[2] = Measured(step_s=[0.2, 0.35, 0.22])
    assert contradictions(settings, measured, "cuda", [1, 3, 5]) == []


# ----- settings that can not run ----------------------------------------------------------------------------------
def test_out_of_memory_and_impossible_settings_are_rows_not_crashes(workdir: Path, tmp_path: Path) -> None:
    script = Script({(2, 1): [0.1], (2, 2): [0.1], (3, 1): [0.15]}, oom={(4, 1), (4, 2)})
    result = _estimate(workdir, tmp_path, script, batch_sizes=[2, 3, 4], num_samples=[1, 2], epochs=[10])
    rows = _rows(result)
    assert not rows[3, 2, 10]["fits"] and rows[3, 2, 10]["note"] == "batch 3 is not a multiple of 2 patches per case"
    for key in ((4, 1, 10), (4, 2, 10)):
        assert not rows[key]["fits"] and rows[key]["note"] == "does not fit (out of memory)"
        assert rows[key]["total_s"] is None and rows[key]["speedup"] is None
    assert [entry[1] for entry in script.log if entry[0] == "open"] == [(2, 1), (2, 2), (3, 1), (4, 1), (4, 2)]
    assert rows[3, 1, 10]["speedup"] == pytest.approx([2 / 3] * 3) and rows[3, 1, 10]["fits"]
    table = format_estimate(result)
    assert table.count("does not fit (out of memory)") == 2 and "batch 3 is not a multiple of 2" in table
    assert json.loads((tmp_path / "e.json").read_text()) == json.loads(json.dumps(result))


def test_a_baseline_that_does_not_fit_leaves_no_ratios(workdir: Path, tmp_path: Path) -> None:
    script = Script({(1, 1): [0.05]}, oom={(2, 1)})
    result = _estimate(workdir, tmp_path, script, batch_sizes=[1], epochs=[100], current_epoch_s=300.0,
                       overrides=["loop.val_iterations=0"])
    reference, smaller = result["rows"]
    assert not reference["fits"] and smaller["speedup"] is None and smaller["epoch_s"] is None  # nothing to anchor
    assert "-" in format_estimate(result).splitlines()[-3]


def test_baseline_flag_chooses_row_one(workdir: Path, tmp_path: Path) -> None:
    script = Script({(4, 2): [0.2], (2, 2): [0.1]})
    result = _estimate(workdir, tmp_path, script, baseline=[4, 2, 16, 16, 16], batch_sizes=[2], epochs=[10],
                       overrides=["loop.val_iterations=0"])
    assert [(r["batch_size"], r["num_samples"], r["baseline"]) for r in result["rows"]] == [(4, 2, True),
                                                                                           (2, 2, False)]
    # 250 iterations either way: half the batch, half the step, half the epoch; the same samples/s
    assert result["rows"][1]["speedup"] == pytest.approx([2.0] * 3)
    assert result["rows"][1]["per_sample"] == pytest.approx([1.0] * 3)


@pytest.mark.parametrize(("request_args", "flag"), [
    ({"cases": 0}, "--cases"), ({"current_epoch_s": 0.0}, "--current-epoch-time"), ({"epochs": [0]}, "--epochs"),
    ({"baseline": [2]}, "--baseline"), ({"iterations_per_epoch": -1}, "--iterations-per-epoch"),
    ({"batch_sizes": [0]}, "--batch-sizes"), ({"schedule": Schedule(rounds=0)}, "--rounds"),
    ({"threads": 0}, "--threads"),
])
def test_bad_requests_name_the_flag(request_args: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        EstimateRequest(**request_args)


def test_a_baseline_patch_of_the_wrong_length_is_refused(workdir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--baseline 2,1,16,16: the patch needs 3 sizes"):
        _estimate(workdir, tmp_path, Script({}), baseline=[2, 1, 16, 16])


# ----- schedules ---------------------------------------------------------------------------------------------------
class RecordingCompiler(Compiler):
    """Records reset / compile calls and counts one graph per compile; compiles nothing."""

    def __init__(self, log: list) -> None:
        self.log, self.count = log, 0

    def reset(self) -> None:
        self.log.append(("reset",))

    def compile(self, function):
        self.log.append(("compile", function))
        self.count += 1
        return function

    def graphs(self) -> int:
        return self.count


def test_rows_are_interleaved_forwards_then_backwards() -> None:
    script = Script({(1, 1): [0.1], (2, 1): [0.2], (3, 1): [0.3]})
    settings = [Setting(b, 1, PATCH) for b in (1, 2, 3)]
    results = measure_settings(settings, script.open_row, rounds=3, interleave=True)
    rounds = [entry[1][0] for entry in script.log if entry[0] == "round"]
    assert rounds == [1, 2, 3, 3, 2, 1, 1, 2, 3]  # A B C, C B A, A B C: drift hits every row alike
    assert script.log[:6] == [("open", (1, 1), None), ("warm", (1, 1)), ("open", (2, 1), None), ("warm", (2, 1)),
                              ("open", (3, 1), None), ("warm", (3, 1))]  # all built and warmed before timing
    assert [r.step_s for r in results] == [[0.1] * 3, [0.2] * 3, [0.3] * 3]
    assert sorted(entry[1][0] for entry in script.log if entry[0] == "close") == [1, 2, 3]


def test_compiling_times_one_row_at_a_time_each_compiled_fresh(workdir: Path, tmp_path: Path) -> None:
    log: list = []
    compiler = RecordingCompiler(log)
    script = Script({(2, 1): [0.1], (4, 1): [0.2]})
    script.log = log
    result = _estimate(workdir, tmp_path, script, batch_sizes=[2, 4], epochs=[10], compiler=compiler,
                       overrides=["loop.compile=on"])
    kinds = [(entry[0], entry[1] if len(entry) > 1 and isinstance(entry[1], tuple) else None) for entry in log]
    assert kinds == [("reset", None), ("open", (2, 1)), ("warm", (2, 1)), ("round", (2, 1)), ("round", (2, 1)),
                     ("round", (2, 1)), ("close", (2, 1)),
                     ("reset", None), ("open", (4, 1)), ("warm", (4, 1)), ("round", (4, 1)), ("round", (4, 1)),
                     ("round", (4, 1)), ("close", (4, 1))]
    assert all(entry[2] is compiler for entry in log if entry[0] == "open")  # the row compiles with it
    assert result["compile"] and not result["schedule"]["interleaved"]
    assert [s["compiled_graphs"] for s in result["settings"]] == [0, 0]  # the scripted rows compiled nothing...
    assert all(s["note"] == "nothing was compiled: this row ran eager" for s in result["settings"])  # ...and say so
    assert "nothing was compiled: this row ran eager" in format_estimate(result)


def test_training_rows_hand_their_step_to_the_compiler(workdir: Path) -> None:
    """The real row compiles its own step through the compiler it is given, after the reset: one step each."""
    from voxseg.bench.timing import config_for
    from voxseg.train.step import TrainStep

    log: list = []
    compiler = RecordingCompiler(log)
    config = config_for("cpu", 1, ["loop.compile=on", "loop.val_iterations=1"])
    schedule = Schedule(warmup=1, iterations=1, rounds=1)
    results = measure_settings([Setting(2, 1, PATCH), Setting(4, 1, PATCH)],
                               lambda s, c: TrainingRow(workdir, s, config, ["SYN_000", "SYN_001"], "gpu",
                                                        schedule, c),
                               rounds=1, interleave=False, compiler=compiler)
    assert [entry[0] for entry in log] == ["reset", "compile", "reset", "compile"]
    steps = [entry[1].__self__ for entry in log if entry[0] == "compile"]
    assert all(isinstance(step, TrainStep) for step in steps) and steps[0] is not steps[1]
    assert [entry[1].__func__ for entry in log if entry[0] == "compile"] == [TrainStep._forward_loss_eager] * 2
    assert [r.compiled_graphs for r in results] == [1, 1] and all(r.fits and len(r.step_s) == 1 for r in results)
    assert all(len(r.val_batch_s) == 1 and r.memory_gb is None for r in results)  # no per-row memory on a CPU


@pytest.mark.slow
def test_each_row_really_compiles_its_own_graph(workdir: Path) -> None:
    """torch.compile for real (CPU inductor): every setting compiles graphs during its own warm-up."""
    from voxseg.bench.timing import config_for

    config = config_for("cpu", 1, ["loop.compile=on", "loop.val_iterations=0"])
    schedule = Schedule(warmup=1, iterations=1, rounds=1, val_batches=0)
    results = measure_settings([Setting(2, 1, PATCH), Setting(4, 1, PATCH), Setting(2, 2, PATCH)],
                               lambda s, c: TrainingRow(workdir, s, config, ["SYN_000"], "gpu", schedule, c),
                               rounds=1, interleave=False, compiler=Compiler())
    assert all(r.compiled_graphs and r.compiled_graphs > 0 and not r.note for r in results), results


# ----- the real thing, small -----------------------------------------------------------------------------------------
def test_cache_mode_is_the_whole_training_sets(workdir: Path, tmp_path: Path) -> None:
    from voxseg.train.cache import choose_cache_mode

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_cache_mode([2 * GIB, 2 * GIB], cpu, budget_gb=5) == "gpu"
    assert choose_cache_mode([3 * GIB, 3 * GIB], cpu, budget_gb=5) == "mmap"
    # pinned when half the RAM holds it
    assert choose_cache_mode([3 * GIB, 3 * GIB], cuda, budget_gb=5) in ("pinned", "mmap")
    script = Script({(2, 1): [0.1]})
    small = _estimate(workdir, tmp_path, script, epochs=[10], overrides=["data.cache_budget_gb=0.001"])
    large = _estimate(workdir, tmp_path, script, epochs=[10], cases=100_000,
                      overrides=["data.cache_budget_gb=0.001"])
    # one tiny case is ~0.1 MB: 4 fit in 1 MB, 100000 do not
    assert small["cache_mode"] == "gpu" and large["cache_mode"] == "mmap"


def test_real_estimate_on_a_tiny_work_directory(workdir: Path, tmp_path: Path) -> None:
    request = EstimateRequest(batch_sizes=[2, 4], num_samples=[1, 2], epochs=[10, 5], iterations_per_epoch=0,
                              device="cpu", schedule=Schedule(warmup=1, iterations=1, rounds=2),
                              overrides=["loop.val_iterations=2"])
    result = run_estimate(workdir, request)
    assert json.loads((workdir / "estimate.json").read_text()) == json.loads(json.dumps(result))
    settings = [(s["batch_size"], s["num_samples"]) for s in result["settings"]]
    assert settings == [(2, 1), (2, 2), (4, 1), (4, 2)]
    assert all(s["fits"] and len(s["step_s"]) == 2 and len(s["val_batch_s"]) == 2 for s in result["settings"])
    assert all(s["step_s"][0] > 0 and s["memory_gb"] is None for s in result["settings"])
    assert result["schedule"]["interleaved"] and result["schedule"]["timing_cases"] == 4 and not result["compile"]
    rows = _rows(result)
    assert len(rows) == 8 and [r["index"] for r in result["rows"]] == list(range(1, 9))
    for (batch, samples, epochs), row in rows.items():
        assert row["iterations_per_epoch"] == math.ceil(4 * samples / batch)  # one pass over fold 0's 4 cases
        assert row["total_s"] == pytest.approx(row["epoch_s"] * epochs)
        median, low, high = row["speedup"]
        assert low <= median <= high
    assert rows[2, 1, 10]["speedup"] == pytest.approx([1.0] * 3)
    assert rows[2, 1, 5]["speedup"] == pytest.approx([2.0] * 3)
    table = format_estimate(result)
    assert "4 training cases (fold 0 of this work directory), one pass over the cases per epoch + 2 validation " \
           "batches every epoch" in table and "rows interleaved" in table


def test_rows_carry_the_memory_model_formula_or_its_calibration(workdir: Path, tmp_path: Path) -> None:
    import shutil

    from voxseg.bench.calibrate import MemoryCalibration
    from voxseg.data.memory import estimate_memory_breakdown
    from voxseg.plans import Plan

    plan = Plan.load(workdir / "plans.json")

    def terms(batch: int) -> dict:
        return estimate_memory_breakdown(plan.network, plan.patch_size, batch, plan.num_channels, plan.num_outputs)

    script = Script({(1, 1): [0.1], (2, 1): [0.1], (4, 1): [0.1]}, memory={(4, 1): 1.25})
    result = _estimate(workdir, tmp_path, script, batch_sizes=[1, 4], epochs=[10])
    rows = _rows(result)
    for batch in (1, 4):
        assert rows[batch, 1, 10]["model_memory_gb"] == pytest.approx(terms(batch)["total"], abs=1e-4)
    assert rows[4, 1, 10]["memory_gb"] == 1.25 and rows[1, 1, 10]["memory_gb"] is None
    assert not result["calibrated"]

    calibrated = tmp_path / "calibrated"
    shutil.copytree(workdir, calibrated)
    fit = MemoryCalibration(device="fake GPU", scale=0.5, fixed_gb=0.25, model_fixed_gb=terms(1)["fixed"])
    plan.memory_calibration = fit.to_dict()
    plan.save(calibrated / "plans.json")
    result = _estimate(calibrated, tmp_path, script, batch_sizes=[4], epochs=[10])
    row = _rows(result)[4, 1, 10]
    assert row["model_memory_gb"] == pytest.approx(0.5 * (terms(4)["total"] - terms(4)["fixed"]) + 0.25, abs=1e-4)
    assert result["calibrated"] and "(calibrated)" in format_estimate(result)
