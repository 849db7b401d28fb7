"""One training step (forward, loss, backward, optimiser: `TrainStep`) and the device-side sums of its losses
(`RunningMeans`). The data that feeds it is `voxseg.train.feed`, prepared ahead by `voxseg.train.prefetch`.

Nothing here reads a tensor on the host: losses come back as detached device tensors and are summed on the
device by `RunningMeans`; the loop reads them only at log intervals and at the end of an epoch, which are the
only host-device syncs of the hot loop (besides the GradScaler's inf check with fp16).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import Tensor, nn


class TrainStep:
    """Owns model, loss, optimiser, GradScaler and autocast dtype; `step(image, seg)` is one micro-batch.

    With `grad_accum` > 1 the loss is divided by it and the optimiser steps every `grad_accum` micro-batches,
    so the gradient equals that of one batch `grad_accum` times larger (for losses that average over the batch).
    This class alone decides where an optimiser step falls: after each micro-batch `optimizer_stepped` says
    whether it completed one, and the loop counts its iterations from that. The count restarts at every
    optimiser step and after a restore (a checkpoint holds no half-accumulated gradients), so a resumed run
    whose `grad_accum` changed still steps after the first `grad_accum` micro-batches of its epoch.

    Args:
        model: the network (kept uncompiled here, so its state_dict has no compile prefixes).
        loss_fn: `loss_fn(output, target) -> (total, components)`.
        optimizer: the optimiser.
        device: where the batches live.
        amp_dtype: torch.bfloat16 / torch.float16 autocast, or None for float32.
        grad_accum: micro-batches per optimiser step.
        grad_clip: max gradient norm (0 = no clipping); with fp16 the gradients are unscaled first.
        compile: torch.compile the forward + loss (the caller decides when this pays: CUDA).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, amp_dtype: torch.dtype | None = None, grad_accum: int = 1,
                 grad_clip: float = 12.0, compile: bool = False) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.grad_accum = max(1, int(grad_accum))
        self.grad_clip = float(grad_clip)
        # only fp16 needs loss scaling; bf16 has float32's exponent range
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)
        self.accumulated = 0  # micro-batches whose gradients wait for the next optimiser step
        self.optimizer_stepped = False  # whether the last micro-batch completed an optimiser step
        self.grad_norm: Tensor | None = None
        self._forward_loss = torch.compile(self._forward_loss_eager) if compile else self._forward_loss_eager

    def compile_with(self, compiler: Callable[[Callable], Callable]) -> None:
        """Run the forward + loss as `compiler(eager forward + loss)` from now on (`voxseg estimate` compiles
        each configuration it times itself, after clearing what earlier ones compiled)."""
        self._forward_loss = compiler(self._forward_loss_eager)

    def _forward_loss_eager(self, image: Tensor, seg: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            output = self.model(image)
        # the loss runs in float32: Dice sums over ~1e6 voxels lose too much in half precision
        if isinstance(output, (list, tuple)):
            output = [o.float() for o in output]
        else:
            output = output.float()
        return self.loss_fn(output, seg)

    def step(self, image: Tensor, seg: Tensor) -> dict[str, Tensor]:
        """One micro-batch: image (B, C, *P), seg (B, 1, *P). Returns {"loss": total, **components}, detached."""
        self.model.train()
        completes = self.accumulated + 1 >= self.grad_accum  # the one place the optimiser-step boundary is decided
        # DDP: all-reduce gradients only on the micro-batch that steps the optimiser
        sync = contextlib.nullcontext() if completes or not hasattr(self.model, "no_sync") else self.model.no_sync()
        with sync:
            total, components = self._forward_loss(image, seg)
            self.scaler.scale(total / self.grad_accum).backward()
        if completes:
            self._optimizer_step()
        self.accumulated = 0 if completes else self.accumulated + 1
        self.optimizer_stepped = completes
        out = {"loss": total.detach()}
        out.update({name: value.detach() for name, value in components.items() if name != "loss"})
        return out

    __call__ = step

    def _optimizer_step(self) -> None:
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            # returns a device tensor: no sync
            self.grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loss scaler; an accumulation starts afresh (older checkpoints' "micro_steps" is unused)."""
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.accumulated = 0
        self.optimizer_stepped = False


class RunningMeans:
    """Sums named 0-dim device tensors without syncing; `means()` reads them all in one transfer.

    Args:
        reduce: applied to the stacked sums before the transfer (the mean over the ranks of a distributed run).
    """

    def __init__(self, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        self.reduce = reduce
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.count += 1

    def means(self) -> dict[str, float]:
        """Host-device sync point: one stacked copy to the host (after `reduce`, e.g. the mean over ranks)."""
        if not self.sums:
            return {}
        stacked = torch.stack(list(self.sums.values()))
        values = (self.reduce(stacked) if self.reduce is not None else stacked).cpu().tolist()
        return {name: v / self.count for name, v in zip(self.sums, values)}
