"""Optional ways to make the denoiser faster on a GPU, each measured by benchmarks/bench_speed.py.

diffusers and torch do the work (`Attention.fuse_projections`, `FusedAttnProcessor2_0`, channels-last
memory format, `torch.compile`); this module only applies them to the UNet and every ControlNet of
a loaded pipeline. BENCHMARKS.md says which of them paid off and which are on by default.
"""

from __future__ import annotations

import torch

OPTIONS = ("channels_last", "fuse_self_attention", "compile")


def _denoisers(pipe) -> list[torch.nn.Module]:
    nets = getattr(pipe.controlnet, "nets", [pipe.controlnet])
    return [pipe.unet, *nets]


def channels_last(pipe) -> None:
    """NHWC activations for the convolutions (tensor-core friendly on Turing and later)."""
    for model in _denoisers(pipe):
        model.to(memory_format=torch.channels_last)


def fuse_self_attention(pipe) -> int:
    """One matrix product for q, k and v of every self-attention (attn1), instead of three.

    Cross-attention stays unfused (its IP-Adapter processor reads to_k/to_v). Not with LoRAs: a LoRA on
    to_q/to_k/to_v would be bypassed by the fused weight, so this refuses once adapters are loaded.
    """
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    if any(getattr(module, "peft_config", None) for module in _denoisers(pipe)):
        raise ValueError("fuse_self_attention cannot run with LoRAs loaded: the fused weights would bypass them")
    fused = 0
    for model in _denoisers(pipe):
        for name, module in model.named_modules():
            if isinstance(module, Attention) and name.endswith("attn1") and not module.is_cross_attention:
                module.fuse_projections(fuse=True)
                module.set_processor(FusedAttnProcessor2_0())
                fused += 1
    return fused


def compile_blocks(pipe) -> int:
    """torch.compile each ResNet and transformer block of the denoisers (regional compilation: a few
    graphs compiled once and reused by every step and image, shorter to compile than the whole UNet)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    compiled = 0
    for model in _denoisers(pipe):
        for module in model.modules():
            if isinstance(module, (BasicTransformerBlock, ResnetBlock2D)):
                module.compile()
                compiled += 1
    return compiled
