"""FaceID Plus V2's files with random weights (smoke: random weights), in the real layout and key names.

`write_faceid` writes what `faceid.ensure_files` looks for: the adapter with every key and shape the official file
has for this UNet (LoRA rank `rank`; 128 in the real file), a CLIP vision encoder (tiny by default, ViT-H/14's
sizes for the GPU benchmark) and a recogniser ONNX with ArcFace's signature (1x3x112x112 -> 512).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch

from instantid_colab.engines.faceid import (
    ADAPTER_FILE, ADAPTER_REPO, IMAGE_ENCODER_DIR, IMAGE_ENCODER_REPO, IMAGE_PROJ, IP_ADAPTER, RECOGNISER_FILE,
    RECOGNISER_REPO, expected_shapes,
)

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224,
                   patch_size=32, projection_dim=32)
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
             patch_size=14, projection_dim=1024, hidden_act="gelu")


def faceid_state_dict(unet, clip_width: int, rank: int, seed: int = 11,
                      dtype: torch.dtype = torch.float32) -> dict[str, dict[str, torch.Tensor]]:
    """Random tensors under the official keys: norms 1/0 as fresh modules, the rest small normals."""
    generator = torch.Generator().manual_seed(seed)

    def tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        norm = key.startswith(("norm.", "perceiver_resampler.norm_out")) or ".norm" in key or ".1.0." in key
        if norm and len(shape) == 1:
            return (torch.ones if key.endswith("weight") else torch.zeros)(shape, dtype=dtype)
        return (torch.randn(shape, generator=generator) * 0.05).to(dtype)

    shapes = expected_shapes(unet, clip_width, rank)
    return {group: {key: tensor(key, shape) for key, shape in shapes[group].items()} for group in (IMAGE_PROJ, IP_ADAPTER)}


def write_faceid(root: Path, unet, vision: dict = TINY_VISION, rank: int = 4, dtype: torch.dtype = torch.float32) -> None:
    """The three FaceID files under `root` (a weights folder), where `faceid.ensure_files` finds them."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from instantid_colab.smoke.diffusion import randomise
    from instantid_colab.smoke.faces import recogniser_model

    folder = root / "identity"
    adapter = folder / ADAPTER_REPO.replace("/", "--") / ADAPTER_FILE
    adapter.parent.mkdir(parents=True, exist_ok=True)
    torch.save(faceid_state_dict(unet, vision["hidden_size"], rank, dtype=dtype), adapter)
    encoder = randomise(CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)), seed=12, gain=1.0).to(dtype)
    encoder.save_pretrained(folder / IMAGE_ENCODER_REPO.replace("/", "--") / IMAGE_ENCODER_DIR)
    recogniser = folder / RECOGNISER_REPO.replace("/", "--") / RECOGNISER_FILE
    recogniser.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(recogniser_model(seed=5), str(recogniser))


def write_full_size(root: Path, unet) -> None:
    """The files at the real sizes (CLIP ViT-H/14, the LoRA at rank 128), fp16, for the GPU benchmarks."""
    write_faceid(root, unet, VIT_H, rank=128, dtype=torch.float16)
