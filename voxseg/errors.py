"""Errors a user can cause. The CLI prints their message without a traceback and exits non-zero.

Every message names the file, case, option or value at fault and says what to do about it.
"""
from __future__ import annotations


class VoxsegError(Exception):
    """Base class of all user-facing errors."""

    exit_code = 2


class DatasetError(VoxsegError):
    """A dataset is missing, unreadable or inconsistent (files, dataset.json, labels, geometry)."""


class ImageReadError(DatasetError):
    """An image file cannot be read (missing, truncated, empty, unsupported format)."""


class ConfigError(VoxsegError):
    """An option, a config file or a plan field is unknown or invalid."""


class CheckpointError(VoxsegError):
    """A checkpoint or model folder is missing, incompatible or unsafe."""


class InputError(VoxsegError):
    """Inputs to predict/evaluate do not match what the model or the command expects."""


class DiskFullError(VoxsegError):
    """The disk filled up while a file was being written (the previous file, if any, is unchanged)."""


class DeviceMemoryError(VoxsegError):
    """The accelerator ran out of memory even after the fallbacks (smaller batches, host memory) were tried."""


class MemoryBudgetError(VoxsegError):
    """A case needs more memory than the budget allows (predict --max-memory, or what is free); refused before
    any work, with the numbers."""
