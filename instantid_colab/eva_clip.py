"""EVA02-CLIP's vision tower (QuanSun/EVA-CLIP, `EVA02_CLIP_L_336_psz14_s6B.pt`), as PuLID reads a face with it.

Written here, not imported: timm (`eva02_large_patch14_clip_336`) and open_clip have this model, but both import
torchvision, which a machine with only torch (this project's CI, a torch-only venv) cannot install beside its torch
without replacing it, and PuLID's own copy (`eva_clip/eva_vit_model.py`) is not a package. This is that model
restricted to what EVA02-CLIP-L-14-336 uses (rotary position embedding, SwiGLU with sub-LayerNorm, no layer scale),
its keys named as in the released checkpoint, its shape read from the checkpoint (timm style: one filter function).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HEAD_WIDTH = 64  # the model config's head_width: not in any tensor's shape
PRETRAINED_GRID = 16  # pt_hw_seq_len: the rotary table was trained on a 16 x 16 grid, interpolated to the real one
HIDDEN_BLOCKS = (4, 8, 12, 16, 20)  # PuLID's return_hidden: the tokens entering these blocks
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OPENAI_DATASET_MEAN/STD
_EPS = 1e-6


class RotaryEmbedding(nn.Module):
    """EVA's VisionRotaryEmbeddingFast: 2-D rotary tables for a grid x grid patch sequence, computed, not stored."""

    def __init__(self, head_dim: int, grid: int):
        super().__init__()
        half = head_dim // 2
        frequencies = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))
        positions = torch.arange(grid) / grid * PRETRAINED_GRID
        angles = torch.einsum("i,f->if", positions, frequencies).repeat_interleave(2, dim=-1)
        grid_angles = torch.cat([angles[:, None, :].expand(grid, grid, half), angles[None, :, :].expand(grid, grid, half)],
                                dim=-1).reshape(-1, head_dim)
        self.register_buffer("cos", grid_angles.cos(), persistent=False)
        self.register_buffer("sin", grid_angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        return x * self.cos + rotated * self.sin


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width, bias=False) for _ in range(3))
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(width)), nn.Parameter(torch.zeros(width))
        self.inner_attn_ln = nn.LayerNorm(width, eps=_EPS)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        batch, length, width = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = F.linear(x, self.k_proj.weight)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        q, k = (torch.cat([t[:, :, :1], rope(t[:, :, 1:])], dim=2).type_as(v) for t in (q, k))  # not the class token
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, width)
        return self.proj(self.inner_attn_ln(out))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(width, hidden), nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.ffn_ln = nn.LayerNorm(hidden, eps=_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=_EPS), nn.LayerNorm(width, eps=_EPS)
        self.attn, self.mlp = Attention(width, heads), SwiGLU(width, hidden)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, patch)


class EVAVisionTower(nn.Module):
    """Pixels [batch, 3, image_size, image_size] (normalised by MEAN/STD) -> (embedding [batch, embed_dim], the five
    hidden states PuLID reads, each [batch, 1 + patches, width])."""

    def __init__(self, image_size: int, patch: int, width: int, depth: int, hidden: int, embed_dim: int):
        super().__init__()
        grid = image_size // patch
        self.image_size = image_size
        self.patch_embed = PatchEmbed(width, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
        self.rope = RotaryEmbedding(HEAD_WIDTH, grid)
        self.blocks = nn.ModuleList(Block(width, width // HEAD_WIDTH, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=_EPS)
        self.head = nn.Linear(width, embed_dim)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        hidden = []
        for index, block in enumerate(self.blocks):
            if index in HIDDEN_BLOCKS:
                hidden.append(x)
            x = block(x, self.rope)
        return self.head(self.norm(x)[:, 0]), hidden


def visual_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The vision tower's tensors from an EVA-CLIP checkpoint (its text tower dropped; the rotary tables, stored as
    buffers in the file, are computed instead, as timm's EVA filter does)."""
    for wrapper in ("state_dict", "module"):
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
    return {key.removeprefix("visual."): value for key, value in checkpoint.items()
            if key.startswith("visual.") and not re.search(r"(^|\.)rope\.", key.removeprefix("visual."))}


def shape_of(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """The tower's hyper-parameters, read from the tensors' shapes (KeyError: a tensor is missing)."""
    width = state_dict["pos_embed"].shape[-1]
    patch = state_dict["patch_embed.proj.weight"].shape[-1]
    grid = round((state_dict["pos_embed"].shape[1] - 1) ** 0.5)
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    return {"image_size": grid * patch, "patch": patch, "width": width, "depth": depth,
            "hidden": state_dict["blocks.0.mlp.w1.weight"].shape[0], "embed_dim": state_dict["head.weight"].shape[0]}


def read(path: Path) -> dict[str, torch.Tensor]:
    """The vision tower's tensors of an EVA-CLIP `.pt` (weights_only) or a safetensors copy."""
    from instantid_colab.adapter import _is_safetensors

    if _is_safetensors(path):
        from safetensors.torch import load_file

        return visual_state_dict(load_file(str(path)))
    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    return visual_state_dict(loaded if isinstance(loaded, dict) else {})
