"""Resampling of images, network outputs and label maps with torch, on whatever device the tensor lives.

The rule is nnU-Net v2's (preprocessing/resampling/default_resampling.py with the default plans' kwargs):

- Images: third-order splines, exactly `skimage.transform.resize(order=3, mode="edge", anti_aliasing=False)`
  (scipy's `zoom(grid_mode=True, mode="nearest")`, then a clip to the input's range), computed as one
  matrix per axis by `voxseg.data.spline` on the tensor's device. A cubic spline keeps edges and small
  structures sharper than linear interpolation, and a model trained by nnU-Net saw its inputs prepared so.
- Network outputs back to the original grid (`restore_to_original`): linear (order 1). nnU-Net resamples the
  logits, then applies the softmax / sigmoid; `F.interpolate(align_corners=False)` is the same linear map
  (voxel centres of the new grid at `(i + 0.5) * old_size / new_size - 0.5`, edges clamped). Prediction
  restores in slabs of rows with the same rule (`voxseg.data.restore`), so memory stays bounded.
- Label maps: every label value is turned into a binary mask, the masks are resampled linearly, and each
  voxel takes the value whose mask is largest; a tie goes to the nearest-neighbour label when it is one
  of the tied values, otherwise to the lowest tied value (batchgenerators' `resize_segmentation` that nnU-Net
  calls). Never a value absent from the input; scores in float64 (as nnU-Net's, so near-ties go the same way),
  a few label values at a time, so that memory stays bounded by `label_chunk` output-sized volumes.
- A separate coarse axis, decided per case by `separate_axis`: when the case's spacing (else the target's)
  has max / min above ANISOTROPY_RATIO and one axis alone is the coarsest, every slice orthogonal to it is
  resampled in 2D first (with the order above; images clipped per slice), then that axis alone with
  nearest values (`order_z` 0), so thick slices are copied, never blended.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from voxseg.data.spline import nearest_along, spline_along, zoom

__all__ = ["resample", "separate_axis", "ANISOTROPY_RATIO", "IMAGE_ORDER", "OUTPUT_ORDER", "ORDER_Z"]

DEFAULT_LABEL_CHUNK = 4
ANISOTROPY_RATIO = 3.0  # max / min spacing above which the coarsest axis is resampled separately (nnU-Net's 3)
IMAGE_ORDER = 3  # spline order of image resampling (nnU-Net's resampling_fn_data_kwargs "order")
OUTPUT_ORDER = 1  # order for logits / probabilities back to the original grid ("resampling_fn_probabilities")
ORDER_Z = 0  # order along a separate coarse axis ("order_z")
TIE_TOLERANCE = 1e-9  # label mask scores this close are a tie (settled by the nearest-neighbour label)


def separate_axis(current_spacing: Sequence[float], new_spacing: Sequence[float],
                  threshold: float = ANISOTROPY_RATIO) -> int | None:
    """The axis resampled separately when going from current_spacing to new_spacing, or None.

    Decided per case: the current spacing is looked at first, the new one only when the current one is not
    anisotropic (max / min spacing > threshold); the axis is that spacing's coarsest, and there is none when
    two or three axes tie for coarsest (e.g. (0.24, 1.25, 1.25)). Preprocessing asks with (case spacing,
    target spacing), restoring a prediction with (target spacing, case spacing), so the two may differ.
    """
    for spacing in (current_spacing, new_spacing):
        values = [float(s) for s in spacing]
        if max(values) / min(values) > threshold:
            coarsest = [a for a, s in enumerate(values) if s == max(values)]
            return coarsest[0] if len(coarsest) == 1 else None
    return None


def resample(
    tensor: torch.Tensor,
    new_shape: Sequence[int],
    is_label: bool = False,
    anisotropy_axis: int | None = None,
    label_chunk: int = DEFAULT_LABEL_CHUNK,
    order: int = IMAGE_ORDER,
    order_z: int = ORDER_Z,
) -> torch.Tensor:
    """Resample a (C, d, h, w) tensor to (C, *new_shape).

    Args:
        tensor: (C, d, h, w) image / logits (float dtype) or label map (integer dtype, negative values allowed).
        new_shape: target spatial shape (3 ints).
        is_label: label map: masks resampled linearly, never a value absent from the input (`order` unused).
        anisotropy_axis: spatial axis (0, 1 or 2) resampled separately after the in-plane resampling (see
            `separate_axis`); None for plain 3D resampling.
        label_chunk: label values resampled at once (bounds memory to that many float output volumes).
        order: spline order for float tensors: 3 for images, 1 (linear) for network outputs; 0..5 allowed.
        order_z: order along anisotropy_axis for float tensors (0 = nearest); labels always use nearest there.

    Returns:
        (C, *new_shape): float32 (float64 input stays float64) for float tensors, the input dtype for labels.
        When the shape is unchanged the input itself is returned (images cast to float32), without a copy.
    """
    if tensor.ndim != 4:
        raise ValueError(f"resample expects a (C, d, h, w) tensor, got shape {tuple(tensor.shape)}")
    new_shape = tuple(int(s) for s in new_shape)
    if len(new_shape) != 3 or min(new_shape) < 1:
        raise ValueError(f"resample: new_shape must be 3 positive ints, got {new_shape}")
    if anisotropy_axis is not None and anisotropy_axis not in (0, 1, 2):
        raise ValueError(f"resample: anisotropy_axis must be 0, 1, 2 or None, got {anisotropy_axis}")
    if tuple(tensor.shape[1:]) == new_shape:
        return tensor if is_label or tensor.dtype == torch.float64 else tensor.float()
    if is_label:
        return _resample_labels(tensor, new_shape, anisotropy_axis, label_chunk)
    values = tensor if tensor.dtype == torch.float64 else tensor.float()
    if anisotropy_axis is None:
        return _resize(values, new_shape, order, None)
    in_plane = _resize(values, new_shape, order, anisotropy_axis)  # the coarse axis keeps its size
    out_size = new_shape[anisotropy_axis]
    if order_z == 0:
        return nearest_along(in_plane, anisotropy_axis, out_size)
    if order_z == 1:
        return _linear(in_plane, new_shape)
    return spline_along(in_plane, anisotropy_axis, out_size, order_z)


def _plane_shape(shape: Sequence[int], new_shape: Sequence[int], axis: int | None) -> tuple[int, ...]:
    """new_shape with `axis` (if any) keeping its current size."""
    return tuple(int(shape[a]) if a == axis else int(new_shape[a]) for a in range(3))


def _linear(x: torch.Tensor, new_shape: Sequence[int]) -> torch.Tensor:
    """Trilinear resampling; an axis that keeps its size is left exactly as it is (scale 1 samples the centres)."""
    if tuple(x.shape[1:]) == tuple(new_shape):
        return x
    return F.interpolate(x[None], size=tuple(new_shape), mode="trilinear", align_corners=False)[0]


def _resize(x: torch.Tensor, new_shape: Sequence[int], order: int, per_slice_axis: int | None) -> torch.Tensor:
    """Order-`order` resampling (3D, or per slice orthogonal to per_slice_axis), clipped like skimage's resize."""
    if order == 1:  # linear never leaves the input range: the clip is a no-op
        return _linear(x, _plane_shape(x.shape[1:], new_shape, per_slice_axis))
    return zoom(x, new_shape, order=order, clip=True, per_slice_axis=per_slice_axis)


def _nearest_map(label_map: torch.Tensor, new_shape: tuple[int, ...]) -> torch.Tensor:
    """Order-0 resampling of a (d, h, w) map (the tie-break of `_argmax_resample`)."""
    out = label_map[None]
    for axis in range(3):
        out = nearest_along(out, axis, new_shape[axis])
    return out[0]


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
        plane_shape = _plane_shape(label_map.shape, new_shape, axis)
        best = _argmax_resample(label_map, values, plane_shape, label_chunk)
        if axis is not None:  # nearest along the coarse axis: thick slices are copied, never blended
            best = nearest_along(best[None], axis, new_shape[axis])[0]
        out[channel] = best
    return out


def _argmax_resample(
    label_map: torch.Tensor, values: torch.Tensor, new_shape: tuple[int, ...], label_chunk: int
) -> torch.Tensor:
    """For each output voxel the label value whose linearly interpolated mask is largest; ties (TIE_TOLERANCE)
    go to the nearest-neighbour label when it is among the tied values, else to the lowest tied value."""
    best_value = torch.empty(new_shape, dtype=label_map.dtype, device=label_map.device)
    # float64 scores; values within TIE_TOLERANCE tie: an exact tie of the exact weights (halfway between two
    # labels) must not be broken by rounding that differs from scipy's
    best_score = torch.full(new_shape, -1.0, dtype=torch.float64, device=label_map.device)
    nearest = _nearest_map(label_map, new_shape)
    nearest_score = torch.zeros(new_shape, dtype=torch.float64, device=label_map.device)
    chunk = max(1, int(label_chunk))
    for start in range(0, values.numel(), chunk):
        chunk_values = values[start : start + chunk]
        one_hot = (label_map[None] == chunk_values.view(-1, 1, 1, 1)).double()  # (k, d, h, w)
        scores = _linear(one_hot, new_shape)
        for k, value in enumerate(chunk_values):  # ascending: a lower value keeps a tie
            better = scores[k] > best_score + TIE_TOLERANCE
            best_score = torch.where(better, scores[k], best_score)
            best_value = torch.where(better, value, best_value)
            nearest_score = torch.where(nearest == value, scores[k], nearest_score)
    tied = (nearest_score >= best_score - TIE_TOLERANCE) & (best_score > 0)
    return torch.where(tied, nearest, best_value)

