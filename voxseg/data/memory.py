"""Memory model of one training step, used by the planner to pick patch and batch size.

Peak GPU memory of a U-Net training step is dominated by the activations autograd keeps for the backward
pass, which scale with batch x patch voxels x features. The model counts them analytically, stage by stage,
exactly as the network in `voxseg.models.unet` stores them:

    encoder stage s (plain)   conv_per_stage x 2 x F_s x V_s   (conv output kept by the norm; the norm output,
                                                               activated in place, kept by the next conv)
    decoder level s           2 x F_s x V_s (concat of skip and upsampled) + conv_per_stage x 2 x F_s x V_s
    input                     C_in x V_0

with V_s the voxels of stage s. On top come the deep-supervision outputs and the loss's float32 tensors,
parameters with gradients and optimiser state, and a fixed CUDA context / workspace overhead.

Example: the nnU-Net reference network (6 stages, 32..320 features) at patch 128^3 keeps ~0.9e9 activation
elements per sample: 3.4 GiB at batch 2 in bf16, x1.65 for the transient peak in backward, plus ~0.3 GiB of
loss tensors, ~0.45 GiB of parameter state and 1 GiB context/workspace -> ~7.3 GiB, matching the 7-8 GiB
nnU-Net uses at 128^3 batch 2.

`voxseg.models.measure` (`measure_saved_activation_elements` on a CPU, `measure_peak_memory_gb` on CUDA)
measures the real network, to check and recalibrate the constants below. Memory figures are GiB.
"""
from __future__ import annotations

import math

from voxseg.network_plan import NetworkPlan, default_blocks_per_stage
from voxseg.units import gib

# Constants of the memory model, calibrated by measurement:
# - SAVED_TENSORS_PER_CONV and CONCAT_TENSORS_PER_DECODER_LEVEL match the saved-for-backward tensors of
#   voxseg.models.unet counted with torch.autograd.graph.saved_tensors_hooks (exact to <0.1% on CPU; see
#   voxseg.models.measure.measure_saved_activation_elements and tests/test_plan.py).
# - ACTIVATION_PEAK_FACTOR, LOSS_TENSORS_PER_OUTPUT, BYTES_PER_PARAMETER, CUDA_CONTEXT_GB and CONV_WORKSPACE_GB
#   are set so the estimate reproduces the calibration point: the nnU-Net reference 3D U-Net (6 stages,
#   features 32..320, InstanceNorm + LeakyReLU, deep supervision) at patch 128^3, batch 2, 4 channels,
#   4 outputs trains in roughly 7-8 GiB of GPU memory under bf16 autocast. Re-check with measure_peak_memory_gb
#   on a real GPU (which reports allocator memory, i.e. the estimate minus CUDA_CONTEXT_GB).
SAVED_TENSORS_PER_CONV = 2.0  # conv output + norm output (the in-place nonlinearity reuses the latter)
CONCAT_TENSORS_PER_DECODER_LEVEL = 2.0  # concat(upsampled, skip) has 2 F channels, kept by the first conv
RESIDUAL_PROJECTION_TENSORS = 1.0  # a residual stage's 1x1 projection output, kept by its norm
ACTIVATION_PEAK_FACTOR = 1.65  # peak/saved: gradient buffers alive during backward, allocator rounding
LOSS_TENSORS_PER_OUTPUT = 4.0  # float32 logits, probabilities, one-hot target, log-probabilities per voxel
BYTES_PER_PARAMETER = 16.0  # fp32 weight + gradient + momentum (12) + bf16 autocast copy (2) + slack
CUDA_CONTEXT_GB = 0.5  # CUDA context, cuDNN/cuBLAS handles: outside torch's allocator
CONV_WORKSPACE_GB = 0.5  # cuDNN workspace of 3D convolutions


def stage_voxels(network: NetworkPlan, patch_size: list[int]) -> list[float]:
    """Voxels of the feature maps of every stage for a patch."""
    shape = [float(p) for p in patch_size]
    voxels = []
    for stride in network.strides:
        shape = [s / t for s, t in zip(shape, stride)]
        voxels.append(float(math.prod(shape)))
    return voxels


def _residual_blocks(network: NetworkPlan) -> list[int]:
    return default_blocks_per_stage(network.n_stages)  # the same schedule the network is built with


def activation_elements(network: NetworkPlan, patch_size: list[int], in_channels: int) -> float:
    """Elements of the tensors the network keeps for backward, per sample (network only, no loss)."""
    voxels = stage_voxels(network, patch_size)
    per_conv = SAVED_TENSORS_PER_CONV
    total = in_channels * voxels[0]
    if network.residual:  # stem conv, then 2 convs per residual block, a projection where shape changes
        blocks = _residual_blocks(network)
        total += per_conv * network.features[0] * voxels[0]
        for s, (f, v) in enumerate(zip(network.features, voxels)):
            projection = RESIDUAL_PROJECTION_TENSORS if s > 0 else 0.0
            total += (2 * blocks[s] * per_conv + projection) * f * v
    else:
        total += sum(network.conv_per_stage * per_conv * f * v for f, v in zip(network.features, voxels))
    decoder = CONCAT_TENSORS_PER_DECODER_LEVEL + network.conv_per_stage * per_conv
    total += sum(decoder * f * v for f, v in zip(network.features[:-1], voxels[:-1]))
    return total


def output_elements(network: NetworkPlan, patch_size: list[int], num_outputs: int) -> float:
    """Logit elements per sample: every decoder level with deep supervision, else the full resolution."""
    voxels = stage_voxels(network, patch_size)[:-1]
    return num_outputs * (sum(voxels) if network.deep_supervision else voxels[0])


def parameter_count(network: NetworkPlan, in_channels: int, num_outputs: int) -> int:
    """Number of weights of the network (biases and norm parameters are negligible and left out)."""
    k = [math.prod(kernel) for kernel in network.kernel_sizes]
    f = network.features
    count = 0
    if network.residual:
        count += k[0] * in_channels * f[0]
        inputs = [f[0]] + f[:-1]
        for s, blocks in enumerate(_residual_blocks(network)):
            count += k[s] * inputs[s] * f[s] + k[s] * f[s] * f[s] + (inputs[s] * f[s] if s > 0 else 0)
            count += (blocks - 1) * 2 * k[s] * f[s] * f[s]
    else:
        inputs = [in_channels] + f[:-1]
        for s in range(network.n_stages):
            count += k[s] * inputs[s] * f[s] + (network.conv_per_stage - 1) * k[s] * f[s] * f[s]
    for s in range(network.n_stages - 1):
        count += math.prod(network.strides[s + 1]) * f[s + 1] * f[s]  # transposed conv
        count += k[s] * 2 * f[s] * f[s] + (network.conv_per_stage - 1) * k[s] * f[s] * f[s]
        count += f[s] * num_outputs  # segmentation head
    return int(count)


def estimate_memory_breakdown(
    network: NetworkPlan,
    patch_size: list[int],
    batch_size: int,
    in_channels: int,
    num_outputs: int,
    dtype_bytes: int = 2,
) -> dict[str, float]:
    """Peak training memory in GiB, by term: activations, loss, parameters, fixed, total."""
    activations = ACTIVATION_PEAK_FACTOR * activation_elements(network, patch_size, in_channels) * dtype_bytes
    loss = LOSS_TENSORS_PER_OUTPUT * output_elements(network, patch_size, num_outputs) * 4
    parameters = parameter_count(network, in_channels, num_outputs) * BYTES_PER_PARAMETER
    terms = {
        "activations": gib(batch_size * activations),
        "loss": gib(batch_size * loss),
        "parameters": gib(parameters),
        "fixed": CUDA_CONTEXT_GB + CONV_WORKSPACE_GB,
    }
    terms["total"] = sum(terms.values())
    return terms


def estimate_memory_gb(
    network: NetworkPlan,
    patch_size: list[int],
    batch_size: int,
    in_channels: int,
    num_outputs: int,
    dtype_bytes: int = 2,
) -> float:
    """Estimated peak GPU memory (GiB, incl. CUDA context) of one training step with this network.

    Example: features [32, 64, 128, 256, 320, 320], patch 128^3, batch 2, 4 channels, 4 outputs, bf16 -> ~7.3;
    each further sample of that size adds ~2.9 GiB.
    """
    return estimate_memory_breakdown(network, patch_size, batch_size, in_channels, num_outputs, dtype_bytes)["total"]


# Inference (no autograd): what one tile's forward pass holds at its peak, measured on a CPU (fp32): the nnU-Net
# reference network (6 stages, 32..320 features) at patch 96x128x160 takes 1.74 GiB per tile in a batch of 1, 2
# or 4, 7.4 x features[0] x voxels x 4 bytes; the count below gives 5.6 of it, and INFERENCE_WORKSPACE_FACTOR
# covers the rest (convolution buffers, allocator rounding).
INFERENCE_WORKSPACE_FACTOR = 1.4


def inference_bytes_per_tile(network: NetworkPlan, patch_size: list[int], in_channels: int, num_outputs: int,
                             dtype_bytes: int = 4) -> float:
    """Peak bytes one tile adds to a forward pass without gradients.

    A U-Net's forward keeps every encoder stage's output for its skip connection (sum of F_s x V_s); at the
    full-resolution decoder level the concatenation (2 F_0 V_0), a convolution's output and its normalised copy
    (2 F_0 V_0) are alive at once, with the input and the logits ((C + K) V_0, float32).

    Example: features [32, 64, 128, 256, 320, 320], patch 96x128x160, 4 channels, 4 outputs, float32 -> ~1.8 GiB.
    """
    voxels = stage_voxels(network, patch_size)
    skips = sum(f * v for f, v in zip(network.features, voxels))
    working = 4 * network.features[0] * voxels[0]
    return INFERENCE_WORKSPACE_FACTOR * ((skips + working) * dtype_bytes + (in_channels + num_outputs) * voxels[0] * 4)
