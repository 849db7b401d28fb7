"""voxseg predict against nnU-Net 2.8.1's predictor on a large many-class CT case, on the same model folder, on this
CPU: wall time, peak memory of each tool's whole process tree, and the voxel agreement of the two label maps.

Steps (everything under --work, in a folder named by the data's size, so that sizes do not mix):
  1. a synthetic CT set with voxseg's generator: 1 channel (int16 Hounsfield units), --classes classes (40 organs
     + background by default), --cases training cases and 1 test case of --depth x 512 x 512 voxels at
     1.25 x 0.8 x 0.8 mm; `voxseg plan` with the target spacing set to 2 x 1.5 x 1.5 mm (--set target_spacing=...;
     the patch and the network are fitted to it) and `voxseg preprocess`; --iterations training iterations of fold
     0 on the CPU (default one: the weights are nearly the initial ones, so the times and memory are the network's
     and the pipeline's, not the training's, but the logits are near ties everywhere; more iterations give them
     margins, for the label agreement; --train-amp bf16 trains faster); `voxseg export --format nnunet` -> an
     nnU-Net v2 model folder. Skipped when that folder exists.
  2. the test case predicted from that folder, fold 0, tile step 0.5, no mirroring, on the CPU, by
       voxseg predict              (its defaults: float32, the CPU forward variant measured and cached)
       nnU-Net's predictor         (nnUNetv2_predict_from_modelfolder -f 0 --disable_tta -device cpu -npp 1 -nps 1,
                                    no probabilities; nnU-Net's own entry point run in benchmarks/.venv-nnunet,
                                    create it with `python benchmarks/predict_speed.py --setup-nnunet`; only its
                                    trainer look-up is replaced, by nnUNetTrainer itself, because the look-up imports
                                    every trainer module and torchvision does not import in that venv)
     each as a whole process (start-up, loading, reading, preprocessing, sliding window, restoring to the input grid,
     writing) with its exit code, wall seconds and peak memory of its process tree: the largest sum, over the process
     and all its descendants (nnU-Net's preprocessing and export workers), of the resident set size (RSS), sampled
     every 0.2 s from /proc as tests/acceptance.py does; the proportional set size (PSS, shared pages counted once,
     acceptance.py's figure) is recorded beside it. A tool that fails, is killed (out of memory) or passes --timeout
     is recorded as such, with the end of what it printed (its full output is in WORK/logs/).
  3. the fraction of equal voxels of the two label maps (and, on the voxels either labels foreground, their
     agreement there, with each tool's share of foreground), and voxseg/nnU-Net for time and peak memory.

The first voxseg run of a model on a machine includes the measurement of the CPU forward variants (a few forward
passes; kept in ~/.cache/voxseg/cpu_forward.json); --warm runs voxseg predict once, untimed, before.

Run: python benchmarks/ct_predict.py [--work /tmp/ct_predict_bench] [--classes 41] [--depth 300] [--cases 2]
         [--iterations 1] [--train-amp auto] [--tools voxseg,nnunet] [--timeout 7200] [--warm] [--nnunet-fp32]
         [--json benchmarks/results/ct_predict.json]
Smoke test (a minute): python benchmarks/ct_predict.py --depth 40 --classes 6 --inplane 96 --json /tmp/ct_smoke.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))  # acceptance.py: process-tree memory, a user's environment
SPACING = (1.25, 0.8, 0.8)
TARGET_SPACING = (2.0, 1.5, 1.5)
NNUNET_CLI = "nnUNetv2_predict_from_modelfolder"


# ----- nnU-Net's side: runs in the nnU-Net interpreter --------------------------------------------------------
def nnunet_cli(argv: list[str]) -> None:
    """nnU-Net's own `nnUNetv2_predict_from_modelfolder ARGV`, its trainer look-up replaced by nnUNetTrainer (the
    exported folder's trainer; the look-up imports every trainer module, and torchvision fails to import here)."""
    import nnunetv2.inference.predict_from_raw_data as raw
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    raw.recursive_find_trainer_class_by_name = lambda *args, **kwargs: nnUNetTrainer
    if "--nnunet-fp32" in argv:  # diagnostic: its accumulators and Gaussian (float16 in nnU-Net) in float32
        import functools

        import torch
        from nnunet_predict_compare import _TorchFloat32

        argv = [a for a in argv if a != "--nnunet-fp32"]
        raw.torch = _TorchFloat32("torch")
        gaussian = functools.partial(raw.compute_gaussian, dtype=torch.float32)
        gaussian.cache_clear = raw.compute_gaussian.cache_clear  # the predictor clears the cache after each run
        raw.compute_gaussian = gaussian
    sys.argv = [NNUNET_CLI, *argv]
    raw.predict_entry_point_modelfolder()


# ----- measuring a process tree -------------------------------------------------------------------------------
def _tree_kib(root: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB summed over process `root` and all its descendants now."""
    from acceptance import tree_pids

    rss = pss = 0
    for pid in tree_pids(root):
        for name, key in ((f"/proc/{pid}/status", "VmRSS:"), (f"/proc/{pid}/smaps_rollup", "Pss:")):
            try:
                lines = Path(name).read_text().splitlines()
            except OSError:
                continue
            value = next((int(line.split()[1]) for line in lines if line.startswith(key)), 0)
            if key == "VmRSS:":
                rss += value
            else:
                pss += value
    return rss, pss


def measure(command: list[str], env: dict[str, str], log: Path, timeout: float) -> dict:
    """Run `command` (its output into `log`), sampling its process tree's memory every 0.2 s; returns its exit code
    (None: stopped at `timeout`), status, wall seconds, peak tree RSS and PSS (GiB) and the end of its output."""
    from acceptance import wait_sampling

    log.parent.mkdir(parents=True, exist_ok=True)
    peak_rss = peak_pss = 0
    with open(log, "wb") as sink:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)

        def sample() -> None:
            nonlocal peak_rss, peak_pss
            rss, pss = _tree_kib(process.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)

        code = wait_sampling(process, start, timeout, sample)
        seconds = time.perf_counter() - start
    try:  # workers left behind by a killed or failed run
        os.killpg(process.pid, 9)
    except ProcessLookupError:
        pass
    status = ("ok" if code == 0 else f"timed out after {timeout:.0f} s" if code is None
              else f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "") if code < 0
              else f"failed (exit {code})")
    tail = log.read_text(errors="replace")[-3000:]
    return {"status": status, "returncode": code, "seconds": round(seconds, 1),
            "peak_rss_gib": round(peak_rss / 2**20, 3), "peak_pss_gib": round(peak_pss / 2**20, 3),
            **({} if code == 0 else {"output_tail": tail})}


# ----- voxseg's side ------------------------------------------------------------------------------------------
def build(work: Path, args: argparse.Namespace) -> Path:
    """The data, the trained fold 0 and its nnU-Net export; returns the nnU-Net model folder."""
    from nnunet_predict_compare import _run

    model = work / "nnunet_model"
    if model.is_dir():
        return model
    voxseg = [sys.executable, "-m", "voxseg"]
    shape = f"{args.depth},{args.inplane},{args.inplane}"
    steps = [
        ["synth", "raw", "--kind", "ct", "--classes", str(args.classes), "--cases", str(args.cases),
         "--test-cases", "1", "--shape", shape, "--spacing", ",".join(map(str, SPACING))],
        ["plan", "raw", "-o", "work", "--val-fraction", "0.5",
         "--set", f"target_spacing={','.join(map(str, TARGET_SPACING))}"],
        ["preprocess", "work"],
        ["train", "work", "--fold", "0", "--device", "cpu", "--epochs", "1", "--iterations", str(args.iterations),
         "--amp", args.train_amp, "--set", "loop.val_iterations=1", "--set", "loop.full_val=false"],
        ["export", "work", "--folds", "0", "--format", "nnunet", str(model)],
    ]
    for step in steps:
        seconds = _run(voxseg + step, args.threads, voxseg=True, cwd=work)
        print(f"voxseg {step[0]}: {seconds:.1f} s", flush=True)
        if step[0] == "plan":
            planned = json.loads((work / "work" / "plans.json").read_text())["target_spacing"]
            if [round(float(s), 6) for s in planned] != list(TARGET_SPACING):
                sys.exit(f"plans.json has target_spacing {planned}, not {list(TARGET_SPACING)}")
    return model


def commands(tool: str, model: Path, images: Path, out: Path, args: argparse.Namespace) -> list[str]:
    if tool == "voxseg":
        return [sys.executable, "-m", "voxseg", "predict", "-m", str(model), "-i", str(images), "-o", str(out),
                "--folds", "0", "--step", "0.5", "--no-mirror", "--device", "cpu"]
    return [args.nnunet_python, __file__, "--nnunet-cli", "-i", str(images), "-o", str(out), "-m", str(model),
            "-f", "0", "-step_size", "0.5", "--disable_tta", "-device", "cpu", "-npp", "1", "-nps", "1",
            "--disable_progress_bar", *(["--nnunet-fp32"] if args.nnunet_fp32 else [])]


def environment(tool: str, threads: int) -> dict[str, str]:
    """A user's shell with `threads` OpenMP threads; this checkout importable for voxseg, nothing for nnU-Net."""
    from acceptance import environment as shell

    env = shell(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    if tool != "voxseg":
        env["PYTHONPATH"] = ""
    return env


def shown(command: list[str], args: argparse.Namespace) -> str:
    """A command line as a user would type it (python, the venv's python, nnU-Net's entry point)."""
    if command[0] == args.nnunet_python and command[2:3] == ["--nnunet-cli"]:
        command = [NNUNET_CLI, *command[3:]]
    return shlex.join(["python" if c == sys.executable else c for c in command])


def machine(args: argparse.Namespace) -> dict:
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    info = {"node": platform.node(), "cores": os.cpu_count(), "cpu": cpu, "memory_gib": round(memory / 2**20, 1),
            "torch": version("torch"), "threads": args.threads}
    if Path(args.nnunet_python).is_file():
        done = subprocess.run([args.nnunet_python, "-c", "import importlib.metadata as m; "
                               "print(m.version('nnunetv2'), m.version('torch'))"],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        if done.returncode == 0:
            info["nnunetv2"], info["nnunet_torch"] = done.stdout.split()
    return info


def plan_summary(work: Path) -> dict:
    plan = json.loads((work / "work" / "plans.json").read_text())
    return {key: plan.get(key) for key in ("target_spacing", "patch_size", "batch_size", "median_shape_after_resample")
            } | {"features": plan["network"]["features"], "strides": plan["network"]["strides"]}


def main() -> None:
    if sys.argv[1:2] == ["--nnunet-cli"]:
        return nnunet_cli(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/ct_predict_bench")
    parser.add_argument("--nnunet-python", default=str(HERE / ".venv-nnunet" / "bin" / "python"))
    parser.add_argument("--classes", type=int, default=41, help="classes, background included (default 41)")
    parser.add_argument("--depth", type=int, default=300, help="slices of each case (default 300)")
    parser.add_argument("--inplane", type=int, default=512, help=argparse.SUPPRESS)  # smaller for smoke runs
    parser.add_argument("--cases", type=int, default=2, help="training cases (default 2)")
    parser.add_argument("--iterations", type=int, default=1,
                        help="training iterations of the model (default 1: nearly the initial weights, near ties "
                             "everywhere; more give the logits margins, for the label agreement)")
    parser.add_argument("--train-amp", choices=("auto", "bf16"), default="auto",
                        help="precision of that training (default auto: float32 on a CPU; bf16 trains ~3x faster "
                             "on a CPU with AMX; prediction is float32 either way)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="OMP/MKL threads of both tools (default: every core, as nnU-Net's CPU predictor sets "
                             "torch's threads to every core itself)")
    parser.add_argument("--tools", default="voxseg,nnunet")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per prediction run (default 7200)")
    parser.add_argument("--warm", action="store_true", help="run voxseg predict once, untimed, first")
    parser.add_argument("--nnunet-fp32", action="store_true",
                        help="diagnostic: nnU-Net's sliding window with float32 instead of float16 accumulators and "
                             "Gaussian (what is left of the label differences is then not its rounding)")
    parser.add_argument("--json", default=str(HERE / "results" / "ct_predict.json"))
    args = parser.parse_args()
    tools = args.tools.split(",")
    if unknown := set(tools) - {"voxseg", "nnunet"}:
        sys.exit(f"unknown tools {sorted(unknown)}: voxseg, nnunet")
    if "nnunet" in tools and not Path(args.nnunet_python).is_file():
        sys.exit(f"no {args.nnunet_python}: create it with `python benchmarks/predict_speed.py --setup-nnunet`")
    shape = (args.depth, args.inplane, args.inplane)
    trained = (f"_{args.iterations}iterations" if args.iterations != 1 else "") + (
        f"_{args.train_amp}" if args.train_amp != "auto" else "")
    name = f"ct_{args.classes}classes_{'x'.join(map(str, shape))}_{args.cases}cases{trained}"
    work = Path(args.work).resolve() / name
    work.mkdir(parents=True, exist_ok=True)
    from predict_speed import _folder, agreement

    model = _folder(build(work, args))
    images = work / "raw" / "imagesTs"
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(args),
              "case": {"shape": list(shape), "spacing": list(SPACING), "classes": args.classes,
                       "channels": 1, "voxels": shape[0] * shape[1] * shape[2],
                       "test_case": sorted(p.name for p in images.glob("*.nii.gz"))},
              "training_cases": args.cases, "training_iterations": args.iterations,
              "training_amp": args.train_amp, "plan": plan_summary(work),
              "model": str(model),
              "settings": "fold 0, tile step 0.5, no mirroring, device cpu, no probabilities",
              "nnunet_fp32_accumulators": args.nnunet_fp32, "tools": {}}
    print(f"case {'x'.join(map(str, shape))} at {SPACING} mm, {args.classes} classes; plan: {report['plan']}",
          flush=True)
    if args.warm and "voxseg" in tools:
        warm = measure(commands("voxseg", model, images, work / "pred" / "warm", args),
                       environment("voxseg", args.threads), work / "logs" / "voxseg_warm.log", args.timeout)
        print(f"voxseg warm-up: {warm['status']}, {warm['seconds']:.1f} s", flush=True)
    folders = {"voxseg": work / "pred" / "voxseg",
               "nnunet": work / "pred" / ("nnunet-fp32" if args.nnunet_fp32 else "nnunet")}
    for tool in tools:
        out = folders[tool]
        shutil.rmtree(out, ignore_errors=True)  # no earlier prediction is taken for this run's
        command = commands(tool, model, images, out, args)
        result = measure(command, environment(tool, args.threads), work / "logs" / f"{tool}.log", args.timeout)
        report["tools"][tool] = {"command": shown(command, args), **result}
        if tool == "nnunet":  # what ran: nnU-Net's entry point through nnunet_cli() above
            report["tools"][tool]["invoked"] = shlex.join(command)
        print(f"{tool}: {result['status']}, {result['seconds']:.1f} s, peak tree RSS {result['peak_rss_gib']:.2f} "
              f"GiB (PSS {result['peak_pss_gib']:.2f} GiB)", flush=True)
        if result["returncode"] != 0:
            print(f"  last output of {tool}:\n{result['output_tail'][-1500:]}", flush=True)
    done = [t for t in ("voxseg", "nnunet") if report["tools"].get(t, {}).get("returncode") == 0]
    if done == ["nnunet"] and any(folders["voxseg"].glob("*.nii.gz")):  # against an earlier voxseg run's labels
        report["agreement_against"] = f"the voxseg prediction already in {folders['voxseg']}"
        done = ["voxseg", "nnunet"]
    if done == ["voxseg", "nnunet"]:
        values = agreement(folders["voxseg"], folders["nnunet"])
        report["agreement"] = values[0] if len(values) == 1 else values
        report["labels"] = label_shares(folders["voxseg"], folders["nnunet"])
    if all(t in report["tools"] and report["tools"][t]["returncode"] == 0 for t in ("voxseg", "nnunet")):
        ours, theirs = report["tools"]["voxseg"], report["tools"]["nnunet"]
        report["voxseg/nnunet"] = {key: round(ours[key] / theirs[key], 3) if theirs[key] else None
                                   for key in ("seconds", "peak_rss_gib", "peak_pss_gib")}
    print_table(report)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.json}")


def label_shares(ours: Path, theirs: Path) -> dict:
    """Per test case: the share of voxels each tool labels foreground, and the agreement on the voxels that either
    labels foreground (a model that labels nearly everything background agrees on nearly every voxel; this says
    how well the two agree where they segment something)."""
    from voxseg.data.io import read_image

    shares = {}
    for path in sorted(theirs.glob("*.nii.gz")):
        a, _ = read_image(ours / path.name)
        b, _ = read_image(path)
        either = (a > 0) | (b > 0)
        on_foreground = float((a[either] == b[either]).mean()) if either.any() else None
        shares[path.name] = {"voxseg_foreground": float((a > 0).mean()), "nnunet_foreground": float((b > 0).mean()),
                             "differing_voxels": int((a != b).sum()), "agreement_on_foreground": on_foreground}
    return shares


def print_table(report: dict) -> None:
    print(f"\n{'tool':8s} {'status':28s} {'seconds':>9s} {'peak RSS GiB':>13s} {'peak PSS GiB':>13s}")
    for tool, r in report["tools"].items():
        print(f"{tool:8s} {r['status']:28s} {r['seconds']:9.1f} {r['peak_rss_gib']:13.2f} {r['peak_pss_gib']:13.2f}")
    if "voxseg/nnunet" in report:
        ratio = report["voxseg/nnunet"]
        print(f"{'voxseg/nnU-Net':37s} {ratio['seconds']:9.2f} {ratio['peak_rss_gib']:13.2f} "
              f"{ratio['peak_pss_gib']:13.2f}")
    if "agreement" in report:
        agree = report["agreement"]
        print("label agreement: " + ", ".join(f"{100 * a:.4f} %" for a in (agree if isinstance(agree, list)
                                                                          else [agree])))
    for case, share in report.get("labels", {}).items():
        print(f"{case}: foreground {100 * share['voxseg_foreground']:.3f} % (voxseg), "
              f"{100 * share['nnunet_foreground']:.3f} % (nnU-Net); {share['differing_voxels']} voxels differ; "
              f"agreement where either labels foreground {100 * (share['agreement_on_foreground'] or 0):.3f} %")


if __name__ == "__main__":
    main()
