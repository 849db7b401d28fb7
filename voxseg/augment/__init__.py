"""Batched data augmentation (spatial + intensity) on the batch's device, decisions drawn on the host.

`augment_batch(image, seg, config, generator, patch_size)` takes crops of `source_size(patch_size, config)`
from the patch sampler and returns augmented patches of `patch_size`; `generator` is a numpy Generator.
`draw_batch_params` + `apply_augment` split the two steps (draw for a global batch, apply to a slice).
"""
from voxseg.augment.config import AugmentConfig
from voxseg.augment.draws import AugmentParams
from voxseg.augment.pipeline import BatchRows, apply_augment, augment_batch, draw_batch_params, source_size

__all__ = ["AugmentConfig", "AugmentParams", "BatchRows", "apply_augment", "augment_batch", "draw_batch_params",
           "source_size"]
