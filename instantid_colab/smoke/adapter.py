"""Random adapter state dicts in the official InstantID layout (smoke: random weights).

They let tests and the GPU benchmark exercise the real inspect/load path with the real key names
and shapes, without the 1.7 GB download.
"""

from __future__ import annotations

import torch

from instantid_colab.adapter import (
    IMAGE_PROJ,
    IP_ADAPTER,
    SDXL_INSTANTID,
    SDXL_IP_HIDDEN_SIZES,
    ResamplerConfig,
    ip_hidden_sizes_for,
    official_image_proj_shapes,
)

FULL_SIZE = SDXL_INSTANTID
FULL_SIZE_IP_HIDDEN_SIZES = SDXL_IP_HIDDEN_SIZES

__all__ = ["FULL_SIZE", "FULL_SIZE_IP_HIDDEN_SIZES", "ip_hidden_sizes_for", "official_adapter_state_dict"]


def official_adapter_state_dict(
    config: ResamplerConfig,
    ip_hidden_sizes: list[int],
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, torch.Tensor]]:
    """`{"image_proj": …, "ip_adapter": …}` with official keys/shapes and random values.

    LayerNorm weights are 1 and biases 0 (as a fresh module), everything else small normals, so the
    smoke Resampler produces finite tokens. `device="meta"` gives shapes without memory.
    """
    generator = torch.Generator().manual_seed(seed)

    def tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if device == "meta" or str(device) == "meta":
            return torch.empty(shape, dtype=dtype, device="meta")
        is_norm = ".norm" in f".{key}" or key.startswith("norm_out") or ".1.0." in key
        if is_norm and len(shape) == 1:
            return (torch.ones if key.endswith("weight") else torch.zeros)(shape, dtype=dtype, device=device)
        return (torch.randn(shape, generator=generator) * 0.02).to(device=device, dtype=dtype)

    image_proj = {key: tensor(key, shape) for key, shape in official_image_proj_shapes(config).items()}
    ip_adapter = {}
    for k, hidden in enumerate(ip_hidden_sizes):
        for kv in "kv":
            key = f"{2 * k + 1}.to_{kv}_ip.weight"
            ip_adapter[key] = tensor(key, (hidden, config.output_dim))
    return {IMAGE_PROJ: image_proj, IP_ADAPTER: ip_adapter}
