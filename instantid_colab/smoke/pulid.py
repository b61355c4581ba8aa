"""PuLID's files with random weights (smoke: random weights), in the real layout and key names.

`write_pulid` writes what `pulid.ensure_files` looks for: the adapter with every key and shape pulid_v1.1.safetensors
has for this UNet (IDFormer tiny by default, the real sizes for the GPU benchmark), an EVA-CLIP checkpoint (a vision
tower under `visual.`, a stand-in text tower and the rotary buffers the real file stores) and a SegFormer face parser
with CelebAMask-HQ's labels in jonathandinu/face-parsing's order.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from instantid_colab.eva_clip import HEAD_WIDTH, EVAVisionTower, RotaryEmbedding
from instantid_colab.engines.pulid import (
    ADAPTER_FILE, ADAPTER_REPO, EVA_FILE, EVA_REPO, ID_DIM, ID_FORMER, PARSER_REPO, expected_shapes,
)

TINY_EVA = dict(image_size=112, patch=14, width=128, depth=24, hidden=341, embed_dim=64)
FULL_EVA = dict(image_size=336, patch=14, width=1024, depth=24, hidden=2730, embed_dim=768)  # EVA02-CLIP-L-14-336
TINY_FORMER = dict(dim=128, depth=5, heads=2, num_id_token=2, num_queries=8, ff_mult=4, mapping_width=64)
FULL_FORMER = dict(dim=1024, depth=10, heads=16, num_id_token=5, num_queries=32, ff_mult=4, mapping_width=1024)
TINY_PARSER = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], num_attention_heads=[1, 1, 2, 2],
                   decoder_hidden_size=32)
FULL_PARSER = dict(depths=[3, 6, 40, 3], hidden_sizes=[64, 128, 320, 512], num_attention_heads=[1, 2, 5, 8],
                   decoder_hidden_size=768)  # jonathandinu/face-parsing: SegFormer mit-b5
PARSER_LABELS = ("background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
                 "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")  # its id2label order


_NORM = re.compile(r"layers\.\d+\.(0\.norm[12]|1\.0)\.(weight|bias)|(mapping_\d|id_embedding_mapping)\.[14]\.(weight|bias)")


def _random(shape: tuple[int, ...], generator: torch.Generator, is_norm: bool, is_weight: bool,
            dtype: torch.dtype) -> torch.Tensor:
    if is_norm:
        return (torch.ones if is_weight else torch.zeros)(shape, dtype=dtype)
    fan_in = shape[-1] if len(shape) > 1 else 1
    return (torch.randn(shape, generator=generator) * (fan_in ** -0.5 if len(shape) > 1 else 0.02)).to(dtype)


def pulid_state_dict(unet, eva: dict = TINY_EVA, former: dict = TINY_FORMER, seed: int = 21,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The adapter file's tensors: norms 1/0 as fresh modules, the rest normals scaled by fan-in."""
    generator = torch.Generator().manual_seed(seed)
    config = {**former, "output_dim": unet.config.cross_attention_dim, "vit_width": eva["width"],
              "id_width": ID_DIM + eva["embed_dim"]}
    tensors = {}
    for group, shapes in expected_shapes(config, unet).items():
        for key, shape in shapes.items():
            is_norm = group == ID_FORMER and bool(_NORM.fullmatch(key))
            tensors[f"{group}.{key}"] = _random(shape, generator, is_norm, key.endswith("weight"), dtype)
    return tensors


def eva_checkpoint(eva: dict = TINY_EVA, seed: int = 22, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """An EVA-CLIP checkpoint as QuanSun/EVA-CLIP stores it: `visual.` tensors, the rotary tables as buffers, a text
    tower (one stand-in tensor) and logit_scale."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {key: tuple(value.shape) for key, value in EVAVisionTower(**eva).state_dict().items()}
    checkpoint = {f"visual.{key}": _random(shape, generator, "norm" in key or "_ln" in key, key.endswith("weight"), dtype)
                  for key, shape in shapes.items()}
    rope = RotaryEmbedding(HEAD_WIDTH, eva["image_size"] // eva["patch"])
    for owner in ["rope", *(f"blocks.{index}.attn.rope" for index in range(eva["depth"]))]:
        checkpoint.update({f"visual.{owner}.freqs_cos": rope.cos.clone(), f"visual.{owner}.freqs_sin": rope.sin.clone()})
    checkpoint.update({"text.token_embedding.weight": torch.zeros(8, 4), "logit_scale": torch.tensor(4.6)})
    return checkpoint


def write_pulid(root: Path, unet, eva: dict = TINY_EVA, former: dict = TINY_FORMER, parser: dict = TINY_PARSER,
                dtype: torch.dtype = torch.float32) -> None:
    """The three PuLID files under `root` (a weights folder), where `pulid.ensure_files` finds them."""
    from safetensors.torch import save_file
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from instantid_colab.smoke.diffusion import randomise

    folder = root / "identity"
    adapter = folder / ADAPTER_REPO.replace("/", "--") / ADAPTER_FILE
    adapter.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in pulid_state_dict(unet, eva, former, dtype=dtype).items()},
              str(adapter))
    encoder = folder / EVA_REPO.replace("/", "--") / EVA_FILE
    encoder.parent.mkdir(parents=True, exist_ok=True)
    torch.save(eva_checkpoint(eva, dtype=dtype), encoder)
    labels = dict(enumerate(PARSER_LABELS))
    model = SegformerForSemanticSegmentation(SegformerConfig(**parser, num_labels=len(labels), id2label=labels,
                                                             label2id={v: k for k, v in labels.items()}))
    randomise(model, seed=23, gain=1.0).to(dtype).save_pretrained(folder / PARSER_REPO.replace("/", "--"))



def write_full_size(root: Path, unet) -> None:
    """The files at the real sizes (EVA02-CLIP-L-14-336, the IDFormer, SegFormer-B5), fp16, for the GPU benchmarks."""
    write_pulid(root, unet, FULL_EVA, FULL_FORMER, FULL_PARSER, torch.float16)
