"""Units shared by every part: memory sizes are GiB (2^30 bytes) everywhere.

Fields and options named `..._gb` (`gpu_memory_gb`, `cache_budget_gb`, `estimated_memory_gb`,
`peak_memory_gb`) are GiB, the unit `torch.cuda` memory figures and `nvidia-smi` (MiB) are based on, so the
planner's memory model, the training cache budget and measured peaks compare without conversion.
"""
from __future__ import annotations

GIB = 2**30
"""Bytes in one GiB."""


def gib(num_bytes: float) -> float:
    """Bytes -> GiB."""
    return num_bytes / GIB
