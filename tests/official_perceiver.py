"""IP-Adapter's perceiver blocks, restated from tencent-ailab/IP-Adapter `ip_adapter/resampler.py` (Apache-2.0), as
PuLID's `encoders_transformer.py` and PhotoMaker's `resampler.py` copy them: the official side of the tests that
compare ours (diffusers' IPAdapterPlusImageProjectionBlock) with those methods' code."""

from __future__ import annotations

import math

import torch
from torch import nn


def FeedForward(dim, mult=4):
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, int(dim * mult), bias=False), nn.GELU(),
                         nn.Linear(int(dim * mult), dim, bias=False))


def reshape_tensor(x, heads):
    bs, length, width = x.shape
    return x.view(bs, length, heads, -1).transpose(1, 2).reshape(bs, heads, length, -1)


class PerceiverAttention(nn.Module):
    def __init__(self, *, dim, dim_head=64, heads=8):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner_dim = dim_head * heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        b, seq_len, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (reshape_tensor(t, self.heads) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(b, seq_len, -1)
        return self.to_out(out)
