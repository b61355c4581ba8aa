"""PhotoMaker V2's file with random weights (smoke: random weights), in the real layout and key names.

`write_photomaker` writes what `photomaker.ensure_files` looks for: `photomaker-v2.bin` with the official groups
(`id_encoder` under model_v2's attribute names, `lora_weights` in the diffusers attention-processor naming the
official file's era wrote: `unet.<layer>.processor.to_q_lora.down.weight`), the ID encoder tiny by default (ViT-L/14
and SDXL's widths for the GPU benchmark), and the buffalo_l recogniser ONNX (ArcFace's signature), as FaceID's.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch

from instantid_colab.engines.common import unet_processors
from instantid_colab.engines.photomaker import (
    ADAPTER_FILE, ADAPTER_REPO, ID_ENCODER, LORA, RECOGNISER_FILE, RECOGNISER_REPO, _id_encoder_class,
)

TINY_VISION_L = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                     patch_size=32, projection_dim=32)
VIT_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
             patch_size=14, projection_dim=768)
_OFFICIAL_PARTS = {"ln0": "0.norm1", "ln1": "0.norm2", "attn.to_q": "0.to_q", "attn.to_out.0": "0.to_out",
                   "ff.0": "1.0", "ff.1.net.0.proj": "1.1", "ff.1.net.2": "1.3"}


def official_id_encoder_keys(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ID encoder's state dict under model_v2's names (the inverse of `photomaker.id_encoder_state_dict`)."""
    official = {}
    for key, value in ours.items():
        if not key.startswith("qformer_perceiver."):
            official[key] = value
            continue
        rest = key.removeprefix("qformer_perceiver.")
        if rest.startswith("proj.net.0.proj."):
            official["qformer_perceiver.token_proj.0." + rest.removeprefix("proj.net.0.proj.")] = value
        elif rest.startswith("proj.net.2."):
            official["qformer_perceiver.token_proj.2." + rest.removeprefix("proj.net.2.")] = value
        elif rest.startswith("norm."):
            official["qformer_perceiver.token_norm." + rest.removeprefix("norm.")] = value
        elif rest.startswith("layers."):
            _, layer, part = rest.split(".", 2)
            part, _, kind = part.rpartition(".")
            prefix = f"qformer_perceiver.perceiver_resampler.layers.{layer}"
            if part == "attn.to_k":
                official[f"{prefix}.0.to_kv.{kind}"] = torch.cat([value, ours[key.replace("attn.to_k", "attn.to_v")]])
            elif part != "attn.to_v":
                official[f"{prefix}.{_OFFICIAL_PARTS[part]}.{kind}"] = value
        else:
            official["qformer_perceiver.perceiver_resampler." + rest] = value
    return official


def lora_state_dict(unet, rank: int, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A rank-`rank` LoRA on q, k, v and out of every UNet attention layer, in the processor naming."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in unet_processors(unet):
        attention = unet.get_submodule(name.removesuffix(".processor"))
        for part, layer in (("to_q", attention.to_q), ("to_k", attention.to_k), ("to_v", attention.to_v),
                            ("to_out", attention.to_out[0])):
            tensors[f"unet.{name}.{part}_lora.down.weight"] = (
                torch.randn(rank, layer.in_features, generator=generator) / layer.in_features ** 0.5).to(dtype)
            tensors[f"unet.{name}.{part}_lora.up.weight"] = (
                torch.randn(layer.out_features, rank, generator=generator) * 0.1 / rank ** 0.5).to(dtype)
    return tensors


def photomaker_state_dict(unet, vision: dict = TINY_VISION_L, rank: int = 4, seed: int = 21,
                          dtype: torch.dtype = torch.float32) -> dict[str, dict[str, torch.Tensor]]:
    """Both groups of a PhotoMaker V2 file for this UNet, random (norms 1/0 as fresh modules)."""
    from transformers import CLIPVisionConfig

    from instantid_colab.smoke.diffusion import randomise

    width = unet.config.cross_attention_dim
    encoder = _id_encoder_class()(CLIPVisionConfig(**vision), width, 2, max(width // 128, 1), 4, width * 5 // 8)
    encoder = randomise(encoder, seed=seed, gain=1.0).to(dtype)
    return {ID_ENCODER: official_id_encoder_keys(encoder.state_dict()), LORA: lora_state_dict(unet, rank, seed + 1, dtype)}


def write_photomaker(root: Path, unet, vision: dict = TINY_VISION_L, rank: int = 4,
                     dtype: torch.dtype = torch.float32) -> None:
    """The PhotoMaker V2 file and the buffalo_l recogniser under `root` (a weights folder)."""
    from instantid_colab.smoke.faces import recogniser_model

    folder = root / "identity"
    adapter = folder / ADAPTER_REPO.replace("/", "--") / ADAPTER_FILE
    adapter.parent.mkdir(parents=True, exist_ok=True)
    torch.save(photomaker_state_dict(unet, vision, rank, dtype=dtype), adapter)
    recogniser = folder / RECOGNISER_REPO.replace("/", "--") / RECOGNISER_FILE
    if not recogniser.is_file():  # FaceID's, the same file
        recogniser.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(recogniser_model(seed=5), str(recogniser))


def write_full_size(root: Path, unet) -> None:
    """The file at the real sizes (CLIP ViT-L/14, the Q-Former and fuse MLP at SDXL's width), fp16, for the GPU
    benchmarks; the LoRA at rank 64 (the real file's rank was not readable offline: an assumption, said so there)."""
    write_photomaker(root, unet, VIT_L, rank=64, dtype=torch.float16)
