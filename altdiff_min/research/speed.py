"""Speed paths: how a loaded model runs faster while computing the same sums. The model files
(layers, unet, vae, text_encoder, attention) hold the maths only; `apply` turns a built model's
modules into faster ones with the same parameters (the state dict is unchanged), and
`load(..., fast=False)` leaves the model as written, for reading and for ablations. What was
applied shows in the model's repr (FastConv3x3 in place of Conv3x3; a compiled UNet is an
OptimizedModule).

  FastConv3x3   on the CPU, the 3×3 convolutions of m9's small, wide levels as one matrix product
  FastDecoder   on the CPU, the VAE decoder's activations in channels_last (oneDNN's own layout)
  CompiledUNet  the UNet as one torch.compile graph (load(..., compile=True), --compile); on CUDA
                replayed as a CUDA graph, with the weights in channels_last

Every path is per module instance, never process-wide: two models in one process (a web server's)
can run one fast and one as written.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.layers import Conv3x3
from ..model.unet import UNet
from ..model.vae import Decoder


class FastConv3x3(Conv3x3):
    """Conv3x3 computed as im2col + one matrix product where that pays, the direct kernel elsewhere.

    On the CPU, oneDNN's direct convolution is slow on small images with many channels (measured on
    2 cores: 35–65 GFLOP/s on m9's 8×8 and 4×4 levels at 1280 channels, against ~290 at 32×32). There
    the same sum runs as one matrix product over the unfolded 3×3 neighbourhoods, 2–4× faster; the
    result is the same up to float rounding. With fewer channels (640 and below) or more pixels the
    direct kernel is as fast or faster, and is kept; and it is kept while this layer's weight
    trains, where the unfolded input (9× the input) would be saved for its gradient. A frozen weight
    (a LoRA's base, a text-encoder-only run) needs only the gradient of the input, Wᵀ·grad folded
    back: autograd then saves no unfolded input, and the product's speed carries into training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if x.device.type != "cpu" or h * w > 64 or self.out_channels < 1024 or (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(x)
        patches = F.unfold(x, 3, padding=1)  # (B, in_ch·9, h·w): column p is pixel p's 3×3 neighbourhood
        # One 2-D product for the whole batch. (weight @ patches would broadcast: with weights that do not
        # require grad, as `load` leaves them, torch.matmul then copies the weight once per picture into
        # a bmm — measured 1.6 s instead of 1.15 s for m9's bf16 UNet step on 2 cores.)
        columns = patches.transpose(0, 1).reshape(patches.shape[1], b * h * w)  # (in_ch·9, B·h·w)
        out = torch.addmm(self.bias[:, None], self.weight.flatten(1), columns)  # (out_ch, B·h·w)
        return out.view(-1, b, h * w).transpose(0, 1).reshape(b, -1, h, w)


class FastDecoder(Decoder):
    """The decoder with its activations in channels_last (NHWC) on the CPU: its latents go in in that
    layout and every convolution, norm and upsampling after them keeps it, so oneDNN runs its
    convolutions without converting each input from NCHW and each output back. Measured on 2 cores
    (m9's decoder, batch 1): fp32 −7% at 256 px and −10% at 512 px, bf16 −12% at 256 px; the
    result is the same sums in another order (2e-5 relative in fp32). Only the activations change
    layout: the weights stay as loaded, so a saved state dict is unchanged (some writers assume
    contiguous tensors). The picture comes back contiguous, as the decoder as written returns it."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.device.type != "cpu":  # measured on the CPU only
            return super().forward(z)
        return super().forward(z.contiguous(memory_format=torch.channels_last)).contiguous()


FAST = {Conv3x3: FastConv3x3, Decoder: FastDecoder}  # the module as written → its fast twin (a subclass adding no state)


def apply(module: nn.Module) -> nn.Module:
    """Turn every module of `module` that has a fast twin into it, in place (the instances keep their
    parameters and buffers; only their class changes), and return `module`."""
    for child in module.modules():
        if type(child) in FAST:
            child.__class__ = FAST[type(child)]
    return module


def as_written(module: nn.Module) -> nn.Module:
    """The inverse of `apply`: every fast module back to the class the model file defines."""
    slow = {fast: plain for plain, fast in FAST.items()}
    for child in module.modules():
        if type(child) in slow:
            child.__class__ = slow[type(child)]
    return module


class CompiledUNet(UNet):
    """A UNet whose calls run one torch.compile graph (fullgraph=True: its forward has no graph break).
    It is compiled in place (nn.Module.compile): the same modules, parameters and state dict; only
    the call changes. The pipeline passes every timestep as a float32 tensor (AltDiffusion.denoise), so
    sampling compiles once per shape of batch and latents, not once per step, whatever the sampler.
    The attention inside takes the fused path (attention.py).

    On CUDA a step of m9 is launch-bound, eager or plainly compiled: at 512 px in fp16 an H200 computed
    for 12 ms of a 38 ms eager step, and the compiled step took 25 ms (tests/profile_step.py). So there
    the graph is recorded once and replayed as a CUDA graph (mode "reduce-overhead"): 8.1 ms; and the
    weights and latents go channels_last, cuDNN's own layout, which saves its NCHW↔NHWC transposes:
    7.5 ms. A replay writes into the memory of the previous one, so each call's ε is copied out (a
    sampler keeps earlier steps' ε)."""

    def __call__(self, latents: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not latents.is_cuda:
            return super().__call__(latents, *args, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()
        return super().__call__(latents.contiguous(memory_format=torch.channels_last), *args, **kwargs).clone()


def compile_unet(unet: UNet) -> CompiledUNet:
    """Turn `unet` into a CompiledUNet in place (see there) and return it; where its weights lie
    (CUDA or not) decides how it runs."""
    cuda = next(unet.parameters()).is_cuda
    if cuda:
        unet.to(memory_format=torch.channels_last)
    unet.__class__ = CompiledUNet
    unet.compile(fullgraph=True, mode="reduce-overhead" if cuda else None)
    return unet
