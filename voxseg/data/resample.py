"""Resampling of images and label maps with torch, on whatever device the tensor lives.

Images use (tri/bi)linear interpolation through `torch.nn.functional.interpolate(align_corners=False)`.
nnU-Net uses cubic splines (scipy `map_coordinates(order=3)`), which are slow on the CPU and unavailable on the
GPU; linear interpolation runs at memory bandwidth on either device, and `align_corners=False` maps the
field of view edge to edge, which is exactly what resampling to a new spacing means (voxel centres of the new
grid sit at `(i + 0.5) * old_size / new_size - 0.5` in old voxel units). `tests/test_preprocess.py` measures
that a smooth function is reproduced to about 1e-2 of its amplitude.

Label maps never get values that were not in the input: each label value is turned into a binary mask,
the masks are interpolated linearly, and every voxel takes the value whose mask is largest (argmax), a few
label values at a time so that memory stays bounded by `label_chunk` output-sized float volumes.

Anisotropic data (one axis much coarser, e.g. 5 mm slices with 0.8 mm in-plane) is resampled in two steps,
as nnU-Net does: in-plane first (bilinear per slice), then along the coarse axis alone (linear for images,
nearest for labels), so that information is never smeared across thick slices by a 3D kernel.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

DEFAULT_LABEL_CHUNK = 4


def resample(
    tensor: torch.Tensor,
    new_shape: Sequence[int],
    is_label: bool = False,
    anisotropy_axis: int | None = None,
    label_chunk: int = DEFAULT_LABEL_CHUNK,
) -> torch.Tensor:
    """Resample a (C, d, h, w) tensor to (C, *new_shape).

    Args:
        tensor: (C, d, h, w) image (any float dtype) or label map (any integer dtype, negative values allowed).
        new_shape: target spatial shape (3 ints).
        is_label: label map: never creates values absent from the input.
        anisotropy_axis: spatial axis (0, 1 or 2) that is coarse and is resampled separately after the
            in-plane resampling; None for plain 3D resampling. The caller decides whether the axis is coarse.
        label_chunk: label values resampled at once (bounds memory to that many float output volumes).

    Returns:
        (C, *new_shape): float32 for images, the input dtype for labels. When the shape is unchanged the
        input itself is returned (images cast to float32), without a copy.
    """
    if tensor.ndim != 4:
        raise ValueError(f"resample expects a (C, d, h, w) tensor, got shape {tuple(tensor.shape)}")
    new_shape = tuple(int(s) for s in new_shape)
    if len(new_shape) != 3 or min(new_shape) < 1:
        raise ValueError(f"resample: new_shape must be 3 positive ints, got {new_shape}")
    if anisotropy_axis is not None and anisotropy_axis not in (0, 1, 2):
        raise ValueError(f"resample: anisotropy_axis must be 0, 1, 2 or None, got {anisotropy_axis}")
    if tuple(tensor.shape[1:]) == new_shape:
        return tensor if is_label else tensor.float()
    if is_label:
        return _resample_labels(tensor, new_shape, anisotropy_axis, label_chunk)
    image = tensor.float()
    if anisotropy_axis is None:
        return F.interpolate(image[None], size=new_shape, mode="trilinear", align_corners=False)[0]
    in_plane = _in_plane(image, new_shape, anisotropy_axis)  # (C, *new_shape with the coarse axis unchanged)
    return _along_axis(in_plane, new_shape, mode="trilinear")


def _in_plane(x: torch.Tensor, new_shape: tuple[int, ...], axis: int) -> torch.Tensor:
    """Bilinear resampling of every slice orthogonal to `axis`; `axis` keeps its size. x: (C, d, h, w) float."""
    plane = [s for a, s in enumerate(new_shape) if a != axis]
    slices = x.movedim(1 + axis, 0)  # (A, C, P1, P2): slices along the coarse axis act as the batch
    if list(slices.shape[2:]) != plane:
        slices = F.interpolate(slices, size=plane, mode="bilinear", align_corners=False)
    return slices.movedim(0, 1 + axis)


def _along_axis(x: torch.Tensor, new_shape: tuple[int, ...], mode: str) -> torch.Tensor:
    """Resample only the axis whose size differs from new_shape. x: (C, d, h, w).

    A 3D interpolation whose other two axes keep their size is exact along them (align_corners=False with
    scale 1 samples the voxel centres themselves), so it changes the coarse axis alone.
    """
    if tuple(x.shape[1:]) == new_shape:
        return x
    align = False if mode == "trilinear" else None  # align_corners applies to linear modes only
    return F.interpolate(x[None], size=new_shape, mode=mode, align_corners=align)[0]


def _resample_labels(
    labels: torch.Tensor, new_shape: tuple[int, ...], axis: int | None, label_chunk: int
) -> torch.Tensor:
    """Per-channel one-hot linear resampling + argmax, in chunks of label values. labels: (C, d, h, w) int."""
    out = torch.empty((labels.shape[0], *new_shape), dtype=labels.dtype, device=labels.device)
    for channel in range(labels.shape[0]):
        label_map = labels[channel]  # (d, h, w)
        values = torch.unique(label_map)  # sorted; a host-device sync, once per case
        if values.numel() == 1:
            out[channel] = values[0]
            continue
        if axis is None:
            best = _argmax_resample(label_map, values, new_shape, label_chunk, None)
        else:
            plane_shape = tuple(label_map.shape[a] if a == axis else new_shape[a] for a in range(3))
            best = _argmax_resample(label_map, values, plane_shape, label_chunk, axis)
            # nearest along the coarse axis: thick slices are copied, never blended ("nearest-exact" uses voxel
            # centres like align_corners=False; plain "nearest" is shifted by half a voxel)
            best = _along_axis(best[None].float(), new_shape, mode="nearest-exact")[0].to(labels.dtype)
        out[channel] = best
    return out


def _argmax_resample(
    label_map: torch.Tensor,
    values: torch.Tensor,
    new_shape: tuple[int, ...],
    label_chunk: int,
    axis: int | None,
) -> torch.Tensor:
    """For each output voxel the label value whose linearly interpolated mask is largest (ties: lowest value)."""
    best_value = torch.empty(new_shape, dtype=label_map.dtype, device=label_map.device)
    best_score = torch.full(new_shape, -1.0, dtype=torch.float32, device=label_map.device)
    chunk = max(1, int(label_chunk))
    for start in range(0, values.numel(), chunk):
        chunk_values = values[start : start + chunk]
        one_hot = (label_map[None] == chunk_values.view(-1, 1, 1, 1)).float()  # (k, d, h, w)
        if axis is None:
            scores = F.interpolate(one_hot[None], size=new_shape, mode="trilinear", align_corners=False)[0]
        else:
            scores = _in_plane(one_hot, new_shape, axis)
        score, index = scores.max(dim=0)  # first maximum within the chunk = lowest value
        better = score > best_score  # strict: earlier (lower) values win ties across chunks too
        best_score = torch.where(better, score, best_score)
        best_value = torch.where(better, chunk_values[index], best_value)
    return best_value
