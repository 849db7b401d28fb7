"""One forward pass of a planned network on the CPU, in each variant voxseg's predictor can choose, and onnxruntime.

Variants (each timed on the same input, the same weights, `--threads` torch threads):
  fp32            float32, (N, C, D, H, W) contiguous: the network as built (nnU-Net's predictor runs this)
  fp32-cl         float32, channels-last, voxseg's instance norm for that layout (voxseg.infer.cpu_forward)
  bf16-cl         bfloat16 convolutions, channels-last (`predict --amp bf16`)
  onnxruntime     the network exported to ONNX, run by onnxruntime's CPU provider (needs voxseg[onnx])
  compile         fp32-cl under torch.compile (inductor, frozen weights: oneDNN convolutions with fused point-wise
                  ops and the norms as generated C++); the compile's own seconds are printed beside it

The torch variants run as `voxseg predict` runs them (`voxseg.infer.cpu_forward.CpuForward`). For each: seconds
per forward (median of --repeats after one warm-up), the ratio to fp32, the largest absolute logit difference
from fp32 and the share of voxels whose argmax differs from fp32's.

Run: python benchmarks/forward_variants.py WORKDIR [--batch 1] [--repeats 3] [--threads 2]
         [--variants fp32,fp32-cl,bf16-cl,onnxruntime,compile] [--weights fold_0/checkpoint_final.pt]
WORKDIR is a voxseg work directory (its plans.json gives network and patch). Without --weights the network keeps
its random initial weights.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from voxseg.infer.cpu_forward import CpuForward, replace_instance_norms  # noqa: E402
from voxseg.jsonio import read_json  # noqa: E402
from voxseg.models.factory import build_network  # noqa: E402
from voxseg.plans import Plan  # noqa: E402


def _onnx_runner(model: torch.nn.Module, example: torch.Tensor, threads: int):
    import onnxruntime as ort

    path = Path(tempfile.mkdtemp()) / "net.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (example,), str(path), input_names=["x"], output_names=["y"], dynamo=False,
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": batch.numpy()})[0])
    return run


def _compiled_runner(prepared: torch.nn.Module, example: torch.Tensor):
    """fp32-cl under torch.compile with frozen weights; returns (run, seconds the compile took)."""
    import torch._inductor.config as inductor

    inductor.freezing = True
    forward = CpuForward(prepared, "fp32-cl")
    prepared.to(memory_format=torch.channels_last_3d if example.ndim == 5 else torch.channels_last)
    forward._layout_of = example.ndim  # the layout is set: the compiled module is not moved again
    forward.network = torch.compile(prepared, dynamic=False)
    start = time.perf_counter()
    with torch.no_grad():
        forward(example)
    return forward, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="fp32,fp32-cl,bf16-cl,onnxruntime")
    parser.add_argument("--weights", help="a checkpoint_*.pt of the work directory (default: random weights)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plan = Plan.from_dict(read_json(Path(args.workdir) / "plans.json"))
    model = build_network(plan, deep_supervision=False).eval()
    if args.weights:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state), strict=False)
    shape = (args.batch, plan.network_in_channels, *plan.patch_size)
    batch = torch.randn(shape)
    print(f"network {plan.network.name}, patch {plan.patch_size}, batch {args.batch}, {args.threads} threads")
    reference = None
    base_seconds = None
    prepared = build_network(plan, deep_supervision=False).eval()
    prepared.load_state_dict(model.state_dict())
    replace_instance_norms(prepared)
    for name in args.variants.split(","):
        compile_seconds = None
        if name == "onnxruntime":
            run = _onnx_runner(model, batch[:1], args.threads)
        elif name == "compile":  # sets the channels-last layout itself
            run, compile_seconds = _compiled_runner(prepared, batch)
        else:
            prepared.to(memory_format=torch.contiguous_format)
            run = CpuForward(prepared, name)
        with torch.no_grad():
            out = run(batch)  # warm-up (oneDNN primitive creation)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = run(batch)
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        if reference is None:
            reference, base_seconds = out, seconds
        diff = (out - reference).abs().max().item()
        flips = (out.argmax(1) != reference.argmax(1)).float().mean().item()
        print(f"{name:12s} {seconds:8.2f} s  x{seconds / base_seconds:5.2f}  max|dlogit| {diff:.3g}  "
              f"argmax differs {100 * flips:.4f} %"
              + (f"  (compile {compile_seconds:.1f} s)" if compile_seconds else ""), flush=True)


if __name__ == "__main__":
    main()
