"""Latency per case through `voxseg serve` against `voxseg predict` of one case from a cold start, and the
throughput of the server with several clients, on the demo's model and test cases, on this machine's CPU.

Steps (everything under --work):
  1. the quick demo (`run_demo(quick=True)`: 4 channels, 32^3 cases, a small trained model) unless --work
     already holds it; --cases copies of its test cases (channel files renamed caseNNN_0000.nii.gz, ...);
  2. cold: `python -m voxseg predict -m MODEL -i ONE_CASE -o OUT --folds 0 --device cpu` as a whole process
     (interpreter start, imports, model loading, the case), --repeats times;
  3. warm: one `voxseg serve` process (started once, not timed), each case sent by `voxseg.client.segment` (upload,
     polling every 20 ms, download), one after the other, --repeats rounds;
  4. throughput: --cases jobs sent by 1, then --clients concurrent clients; jobs per second from the first upload
     to the last download.

Run: python benchmarks/serve_latency.py [--work DIR] [--cases 20] [--clients 4] [--repeats 5] [--threads 1]
     (--threads N, default 1, sets OMP_NUM_THREADS for both tools, as the test server runs; 0 leaves
     PyTorch's default for predict)
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s ({min(values):.3f}-{max(values):.3f}, n={len(values)})"


def _cases(work: Path, count: int) -> list[list[Path]]:
    from voxseg.demo import run_demo

    if not (work / "model" / "training" / "fold_0").is_dir():
        run_demo(work, quick=True, device="cpu")
    images = work / "Dataset001_Synth" / "imagesTs"
    first = sorted(images.glob("*_0000.nii.gz"))[0].name[: -len("_0000.nii.gz")]
    folder = work / "bench_cases"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    cases = []
    for index in range(count):
        files = []
        for channel in range(4):
            target = folder / f"case{index:03d}_{channel:04d}.nii.gz"
            shutil.copyfile(images / f"{first}_{channel:04d}.nii.gz", target)
            files.append(target)
        cases.append(files)
    return cases


def cold_predict(work: Path, files: list[Path], repeats: int, env: dict[str, str]) -> list[float]:
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "voxseg", "predict", "-m", str(work / "model"), "-i",
                            *map(str, files), "-o", out, "--folds", "0", "--device", "cpu"], env=env, check=True,
                           capture_output=True)
            times.append(time.perf_counter() - start)
    return times


def throughput(url: str, cases: list[list[Path]], clients: int) -> float:
    from voxseg.client import segment

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda files: segment(url, files, poll_seconds=0.02), cases))
    return len(cases) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "voxseg-serve-bench")
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    cases = _cases(args.work, args.cases)
    cold = cold_predict(args.work, cases[0], args.repeats, env)
    from serve_helpers import Server
    from voxseg.client import segment

    server = Server(args.work / "model", args.work / "jobs", "--folds", "0")
    try:
        segment(server.url, cases[0], poll_seconds=0.02)  # the first case measures the CPU forward variant
        warm = []
        for _ in range(args.repeats):
            for files in cases[: max(1, args.cases // 4)]:
                start = time.perf_counter()
                segment(server.url, files, poll_seconds=0.02)
                warm.append(time.perf_counter() - start)
        one = throughput(server.url, cases, 1)
        several = throughput(server.url, cases, args.clients)
    finally:
        server.stop()
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (cpus {os.cpu_count()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')})")
    print("| measure | value |\n|---|---|")
    print(f"| voxseg predict, one case, cold process | {_median(cold)} |")
    print(f"| voxseg serve, one case through the client, warm | {_median(warm)} |")
    print(f"| ratio cold / warm (medians) | {statistics.median(cold) / statistics.median(warm):.1f}x |")
    print(f"| throughput, 1 client, {args.cases} jobs | {one:.2f} jobs/s |")
    print(f"| throughput, {args.clients} clients, {args.cases} jobs | {several:.2f} jobs/s |")


if __name__ == "__main__":
    main()
