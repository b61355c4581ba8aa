"""Random-weight SDXL components with the real structure, written in the real diffusers folder layout.

Two sizes share one code path: TINY (tests and `--smoke`, CPU, seconds) and FULL (benchmarks: the
real SDXL shapes, so memory and time are those of the real model). Nothing here downloads anything:
the tokenizers are built from a byte-level vocabulary written by hand, because a real CLIP vocabulary
would need the hub.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that differ from diffusers' defaults).
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

# text_encoder (CLIP ViT-L/14) and text_encoder_2 (OpenCLIP ViT-bigG/14) of SDXL base.
SDXL_TEXT_ENCODER_CONFIG = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}
SDXL_TEXT_ENCODER_2_CONFIG = {
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280,
}

# madebyollin/sdxl-vae-fp16-fix (SDXL VAE structure; force_upcast off because fp16 is safe there).
SDXL_VAE_CONFIG = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 512,
    "scaling_factor": 0.13025,
    "force_upcast": False,
}

# SDXL base scheduler/scheduler_config.json (Euler).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "sample_max_value": 1.0,
}

# Tiny versions: same block types, text_time embedding, two text encoders whose hidden sizes add up to
# the cross-attention width, VAE with 4 levels (scale factor 8, like the real one).
TINY_UNET_CONFIG = {
    "sample_size": 16,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [2, 4],
    "transformer_layers_per_block": [1, 1],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 64,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}
TINY_TEXT_ENCODER_CONFIG = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32,
}
TINY_TEXT_ENCODER_2_CONFIG = {**TINY_TEXT_ENCODER_CONFIG, "hidden_act": "gelu"}
TINY_VAE_CONFIG = {
    "block_out_channels": [8, 16, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 128,
    "scaling_factor": 0.13025,
    "force_upcast": False,
    # Without the mid-block attention over every latent pixel: at 1024 px (the refine and swap crop) it is a
    # 16384x16384 attention map, a second of CPU time per encode or decode, and the plumbing is the same without it.
    "mid_block_add_attention": False,
}
# The IdentityNet's conditioning embedding runs at the picture's full size: SDXL's (16, 32, 96, 256) channels cost
# the tiny nets a second per step at 1024 px.
TINY_CONDITIONING_CHANNELS = (4, 8, 8, 16)


@dataclass(frozen=True)
class DiffusionSizes:
    unet: dict
    text_encoder: dict
    text_encoder_2: dict
    vae: dict
    scheduler: dict = field(default_factory=lambda: dict(SDXL_SCHEDULER_CONFIG))
    init_gain: float = 1.0  # < 1 keeps deep random fp16 nets from overflowing


TINY = DiffusionSizes(TINY_UNET_CONFIG, TINY_TEXT_ENCODER_CONFIG, TINY_TEXT_ENCODER_2_CONFIG, TINY_VAE_CONFIG)
FULL = DiffusionSizes(
    SDXL_UNET_CONFIG, SDXL_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG, SDXL_VAE_CONFIG, init_gain=0.5
)


def _byte_vocab() -> dict[str, int]:
    """A byte-level BPE vocabulary with no merges: every text tokenises, one token per character.

    This is GPT-2's byte-to-unicode table (which CLIP uses); written here because the real CLIP vocab
    lives on the hub.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def write_tokenizer(folder: Path, pad_token: str) -> int:
    """Write vocab.json, merges.txt and tokenizer_config.json; returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _byte_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": pad_token,
                    "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}),
        encoding="utf-8",
    )
    return len(vocab)


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int, gain: float) -> torch.nn.Module:
    """Re-draw every weight matrix/kernel as N(0, gain / sqrt(fan_in)), biases 0, norms 1.

    Deterministic per seed and never zero (a ControlNet's zero convs would otherwise make the
    IdentityNet a no-op in smoke tests).
    """
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if param.ndim >= 2:
            if param.device not in generators:
                generators[param.device] = torch.Generator(param.device).manual_seed(seed)
            fan_in = math.prod(param.shape[1:])
            values = torch.randn(param.shape, generator=generators[param.device], device=param.device)
            param.copy_(values.mul_(gain / math.sqrt(fan_in)))
        elif "norm" in name and name.endswith("weight"):
            param.fill_(1.0)
        else:
            param.zero_()
    return model


def build_unet(sizes: DiffusionSizes, seed: int = 0):
    from diffusers import UNet2DConditionModel

    return randomise(UNet2DConditionModel(**sizes.unet), seed, sizes.init_gain)


def build_identitynet(unet, seed: int = 1):
    """The IdentityNet has exactly its UNet's encoder half (InstantX's config is the SDXL UNet's)."""
    from diffusers import ControlNetModel

    tiny = unet.config.block_out_channels[0] < 320
    channels = TINY_CONDITIONING_CHANNELS if tiny else (16, 32, 96, 256)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels, load_weights_from_unet=False)
    return randomise(net, seed, 1.0 if tiny else 0.5)


def write_base(root: Path, sizes: DiffusionSizes, dtype: torch.dtype = torch.float32,
               device: str = "cpu", seed: int = 0):
    """Write a diffusers SDXL pipeline folder (model_index.json + components); returns the UNet."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(root / "tokenizer", pad_token="<|endoftext|>")
    write_tokenizer(root / "tokenizer_2", pad_token="!")
    with torch.device(device):
        for index, (name, cls, config) in enumerate([
            ("text_encoder", CLIPTextModel, sizes.text_encoder),
            ("text_encoder_2", CLIPTextModelWithProjection, sizes.text_encoder_2),
        ]):
            text_config = CLIPTextConfig(**{**config, "vocab_size": vocab_size}, eos_token_id=vocab_size - 1,
                                         bos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1)
            model = randomise(cls(text_config), seed + 10 + index, sizes.init_gain)
            save_text_encoder(model.to(dtype), root / name)
            del model
        vae = randomise(AutoencoderKL(**sizes.vae), seed + 20, 1.0)
        vae.to(dtype).save_pretrained(root / "vae")
        del vae
        unet = build_unet(sizes, seed).to(dtype)
        unet.save_pretrained(root / "unet")
    EulerDiscreteScheduler.from_config(sizes.scheduler).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }, indent=2))
    return unet


def save_text_encoder(model, folder: Path) -> None:
    """save_pretrained, then the weights' keys as SDXL's own files spell them (`text_model.…`, `text_projection.…`):
    transformers 5 writes CLIPTextModel's without the `text_model.` prefix, which transformers 4 reads as missing
    (every weight left random), so smoke files from one version would not be the same model in another."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(folder, safe_serialization=True)
    (path,) = folder.glob("*.safetensors")
    tensors = load_file(path)
    save_file({key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}": tensor
               for key, tensor in tensors.items()}, path, metadata={"format": "pt"})


def write_identitynet(folder: Path, unet, dtype: torch.dtype = torch.float32, seed: int = 1) -> None:
    """Write InstantID/ControlNetModel/{config.json, diffusion_pytorch_model.safetensors}."""
    with torch.device(unet.device):
        net = build_identitynet(unet, seed).to(dtype)
    net.save_pretrained(folder)
