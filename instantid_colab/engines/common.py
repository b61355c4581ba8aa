"""The engine interface, and what every identity engine shares on the one loaded UNet: swapping attention
processors in for a call and back, tokens computed once per call instead of at every step, the (negative,
positive) embedding pair.

An engine (one per method of `engines.METHODS`) has `conditioning(call: EngineCall) -> Conditioning`,
`describe(values) -> dict` (its PNG metadata), `where() -> str` (the memory panel), `to(device)` (its layers that
wait off the UNet), `release(pipe)` (give its memory back), `lora_adapters` (its own LoRA, on for its calls only)
and `photo_side` (the largest side its face photos are opened at; None: whole).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class EngineCall:
    """What one pipeline call gives an engine."""

    pipe: Any
    analyzer: Any  # faces.FaceAnalyzer
    photos: list  # the face photos, opened at the engine's photo_side
    cast: Any  # people.Cast: identities, keypoint images and regions (InstantID's keypoint layout)
    several_people: bool  # the cast is people, each in their region (not one face)
    values: dict  # the call's checked settings
    do_cfg: bool
    num: int  # images per prompt
    device: torch.device
    dtype: torch.dtype
    generator: torch.Generator
    text: dict  # the prompt's embeddings (`prompt_embeds`, `pooled_prompt_embeds`, negatives), as encoded for the UNet
    prompt: str  # the styled prompt the embeddings were made from
    negative_prompt: str
    encode: Callable[[str, str], dict]  # (prompt, negative) -> embeddings as `text`, the pipeline's own encoding


@dataclass
class ControlSlot:
    """One ControlNet of a call: the model, what it sees, how strongly and over which fraction of the steps."""

    model: Any
    image: Any
    scale: float
    start: float = 0.0
    end: float = 1.0


@dataclass
class Conditioning:
    """An engine's answer for one call."""

    arguments: dict  # pipeline call arguments (ip_adapter_image_embeds, cross_attention_kwargs)
    context: contextlib.AbstractContextManager  # installs the engine's layers for the call, and takes them off after
    controlnets: list[ControlSlot] = field(default_factory=list)  # before the extra ControlNets (official order)
    text: dict | None = None  # replaces the prompt's embeddings for the call
    after_step: Callable[[int, dict], dict] | None = None  # changes the callback's tensors after a step
    tensor_inputs: tuple[str, ...] = ()  # the callback tensors after_step changes besides the latents


def unet_processors(unet) -> dict:
    """The UNet's own attention processors by layer name, in `attn_processors` order (the order of the file's
    numbered keys, as the official `ModuleList(attn_processors.values())` on a UNet without an adapter); not those
    inside a loaded adapter's projection, which diffusers also lists."""
    return {name: processor for name, processor in unet.attn_processors.items()
            if not name.startswith("encoder_hid_proj.")}


def set_processors(unet, processors: dict) -> None:
    """Put these processors on their layers (the others untouched; `set_attn_processor` wants every layer)."""
    for name, processor in processors.items():
        unet.get_submodule(name.removesuffix(".processor")).set_processor(processor)


def attention_shapes(unet) -> list[tuple[int, int, bool]]:
    """(width, key/value input width, is cross-attention) of every UNet attention layer, in file order."""
    shapes = []
    for name in unet_processors(unet):
        attention = unet.get_submodule(name.removesuffix(".processor"))
        shapes.append((attention.to_q.in_features, attention.to_k.in_features, name.endswith("attn2.processor")))
    return shapes



class _Tokens(torch.nn.Module):
    """Stands in for a method's projection during one call: the UNet would recompute the same tokens every step."""

    def __init__(self, tokens: torch.Tensor):
        super().__init__()
        self.tokens = tokens[:, None]  # [batch, 1 image, tokens, cross_dim], the Resampler's output layout

    def forward(self, image_embeds) -> list[torch.Tensor]:
        batch = image_embeds[0].shape[0]  # a step computed on the conditional half only gets its half
        return [self.tokens[-batch:] if batch < self.tokens.shape[0] else self.tokens]



@contextlib.contextmanager
def layers_for_the_call(unet, processors: dict, projection) -> Iterator[None]:
    """A method's attention processors (by layer name; the others untouched) and projection (None: none) on `unet`
    for one call; the ones it had (InstantID's) back afterwards."""
    own_processors, own_projection = unet_processors(unet), unet.encoder_hid_proj
    set_processors(unet, processors)
    unet.encoder_hid_proj = projection
    try:
        yield
    finally:
        set_processors(unet, own_processors)
        unet.encoder_hid_proj = own_projection


def read_two_groups(path, groups: tuple[str, str], expected_file: str) -> dict[str, dict]:
    """A method file's two groups of tensors (`{group: {key: tensor}}`) from the official pickle (weights_only) or
    a safetensors copy (keys `group.key`); AdapterError naming what was found when the pickle holds other groups."""
    import zipfile

    from instantid_colab.adapter import AdapterError, _is_safetensors

    if _is_safetensors(path):
        from safetensors import safe_open

        found: dict[str, dict] = {group: {} for group in groups}
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                group, _, rest = key.partition(".")
                found.setdefault(group, {})[rest] = handle.get_tensor(key)
        return found
    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    if not isinstance(loaded, dict) or set(loaded) != set(groups):
        keys = list(loaded)[:5] if isinstance(loaded, dict) else type(loaded).__name__
        raise AdapterError(f"{path}: expected the groups {' and '.join(groups)}, found {keys}. This is not "
                           f"{expected_file}; download it again (download --force {path}).")
    return loaded


@contextlib.contextmanager
def tokens_for_the_call(unet, tokens: torch.Tensor) -> Iterator[None]:
    """For one pipeline call, the precomputed tokens [batch, tokens, cross_dim] where the UNet would ask its
    projection (`encoder_hid_proj`) at every step."""
    projection = unet.encoder_hid_proj
    unet.encoder_hid_proj = _Tokens(tokens)
    try:
        yield
    finally:
        unet.encoder_hid_proj = projection


def execution_device(pipe) -> torch.device:
    """Where the pipeline computes (with offload hooks: the GPU, not where the weights wait).

    diffusers answers by walking every module of every component; ask once, at load.
    """
    return getattr(pipe, "_execution_device", None) or pipe.device


def embedding_pair(embedding, shape: tuple, negative_noise: float, do_cfg: bool, generator) -> torch.Tensor:
    """(negative, positive) face embedding in `shape` (positive alone without CFG); the negative is zero, as the
    official code's, or noise: ComfyUI_InstantID's "noise", which fights the burnt look of a zero negative."""
    embeds = torch.as_tensor(np.asarray(embedding), dtype=torch.float32).reshape(shape)
    negative = torch.zeros_like(embeds)
    if negative_noise > 0:
        negative = negative_noise * torch.randn(embeds.shape, generator=generator)
    return torch.cat([negative, embeds]) if do_cfg else embeds


def per_image(pair: torch.Tensor, num: int) -> torch.Tensor:
    """Each half of a (negative, positive) batch repeated per image, negatives first (diffusers' layout)."""
    return torch.cat([pair[i:i + 1].repeat(num, *[1] * (pair.dim() - 1)) for i in range(pair.shape[0])])


_PERCEIVER_PARTS = {"0.norm1": "ln0", "0.norm2": "ln1", "0.to_q": "attn.to_q", "0.to_out": "attn.to_out.0",
                    "1.0": "ff.0", "1.1": "ff.1.net.0.proj", "1.3": "ff.1.net.2"}


def perceiver_layers_to_diffusers(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """IP-Adapter's perceiver layer keys (`{prefix}layers.N.0.to_kv.weight`, ...), as the official IP-Adapter,
    PuLID and PhotoMaker files name them, -> diffusers' IPAdapterPlusImageProjectionBlock names (the fused to_kv
    split into to_k and to_v); every other key unchanged."""
    mapped = {}
    for key, value in tensors.items():
        found = re.fullmatch(rf"{re.escape(prefix)}layers\.(\d+)\.(\d\.\w+)\.(weight|bias)", key)
        if found is None:
            mapped[key] = value
            continue
        layer = f"{prefix}layers.{found.group(1)}"
        if found.group(2) == "0.to_kv":
            mapped[f"{layer}.attn.to_k.weight"], mapped[f"{layer}.attn.to_v.weight"] = value.chunk(2, dim=0)
        else:
            mapped[f"{layer}.{_PERCEIVER_PARTS.get(found.group(2), found.group(2))}.{found.group(3)}"] = value
    return mapped


def load_recogniser(path, device: str, source: str):
    """insightface's ArcFace recogniser from an ONNX file, on the CUDA provider where `device` is "cuda";
    AdapterError when insightface does not read the file as one (`source`: "REPO FILE", to fetch it again)."""
    from insightface.model_zoo import model_zoo

    from instantid_colab.adapter import AdapterError
    from instantid_colab.weights import reading

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    with reading("the buffalo_l recogniser", path):
        recogniser = model_zoo.get_model(str(path), providers=providers)
    if recogniser is None or getattr(recogniser, "taskname", None) != "recognition":
        raise AdapterError(f"{path}: insightface does not read it as a face recogniser; download {source} again "
                           f"(download --force {path}).")
    recogniser.prepare(ctx_id=0 if device == "cuda" else -1)
    return recogniser
