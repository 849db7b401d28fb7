"""Batched, device-side data augmentation (spatial + intensity), seeded by a torch.Generator on the device.

`augment_batch(image, seg, config, generator, patch_size)` takes crops of `source_size(patch_size, config)`
from the patch sampler and returns augmented patches of `patch_size`.
"""
from voxseg.augment.config import AugmentConfig
from voxseg.augment.pipeline import augment_batch, source_size

__all__ = ["AugmentConfig", "augment_batch", "source_size"]
