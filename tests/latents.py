"""What a generation handed to the VAE, for tests that compare latents between two ways of making a picture."""

from __future__ import annotations

import torch

from instantid_colab import pipeline


def generate_with_latents(session, monkeypatch, *args, **kwargs):
    """pipeline.generate, and the latents it handed to the VAE."""
    seen = []
    decode = pipeline.decode
    monkeypatch.setattr(pipeline, "decode", lambda pipe, latents, notices: seen.append(latents.clone()) or
                        decode(pipe, latents, notices))
    result = pipeline.generate(session, *args, **kwargs)
    monkeypatch.setattr(pipeline, "decode", decode)
    return result, seen[-1]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
