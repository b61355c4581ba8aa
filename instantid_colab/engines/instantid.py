"""The face's two routes into SDXL, and the face region both obey.

- IP attention: the Resampler's 16 face tokens are attended to beside the text in every UNet
  cross-attention (diffusers' IP-Adapter-Plus processors, loaded by `adapter.load_adapter`).
- IdentityNet: InstantID's ControlNet, whose cross-attention context is the face tokens, not the text.
- "Enhance non-face region": the face box gates both. The official pipeline resizes the box
  *bilinearly* to each IdentityNet residual and with *nearest* to each attention map
  (`pipeline_stable_diffusion_xl_instantid_full.py`, `ip_adapter/attention_processor.py`); `FaceRegion`
  does exactly that, once per size instead of once per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

try:
    from diffusers.models.controlnets.controlnet import ControlNetOutput
except ImportError:  # diffusers < 0.32 kept ControlNets in one module
    from diffusers.models.controlnet import ControlNetOutput

from instantid_colab.components import parameter_dtype
from instantid_colab.engines.common import (
    Conditioning, ControlSlot, EngineCall, embedding_pair, per_image, tokens_for_the_call,
)
from instantid_colab.images import WORKING_SIDE


class FaceRegion:
    """Where each person's identity acts (1 inside, 0 outside), at output resolution, resized the official way
    for each consumer. One mask per person: one for the official single face (its box), several for several
    people (`people.regions` makes them disjoint, so a position belongs to one person at most)."""

    def __init__(self, masks: torch.Tensor):
        """masks: [people, height, width] or [height, width] (one person) of 0/1 values, on the CPU; each use
        moves its own copy."""
        self.masks = masks if masks.ndim == 3 else masks[None]
        self._resized: dict[tuple, torch.Tensor | list[torch.Tensor]] = {}

    @property
    def people(self) -> int:
        return self.masks.shape[0]

    def residual_weight(self, residual: torch.Tensor, person: int = 0) -> torch.Tensor:
        """[1, 1, h, w] for an IdentityNet residual of `person`: bilinear, as the official control mask list."""
        key = ("residual", person, tuple(residual.shape[-2:]), residual.dtype, residual.device)
        if key not in self._resized:
            box = self.masks[person][None, None].to(residual.device, residual.dtype)
            self._resized[key] = F.interpolate(box, size=residual.shape[-2:], mode="bilinear")
        return self._resized[key]

    def attention_rows(self, num_queries: int, device: torch.device) -> list[torch.Tensor]:
        """Per person, the indices of the attention-map positions inside their region: the official mask,
        resized with nearest and the official ratio arithmetic, is 1 there and 0 everywhere else."""
        key = ("attention", num_queries, device)
        if key not in self._resized:
            height, width = self.masks.shape[-2:]
            ratio = (height * width / num_queries) ** 0.5
            resized = F.interpolate(self.masks[:, None].float(), scale_factor=1 / ratio, mode="nearest")
            resized = resized.reshape(self.people, -1)
            if resized.shape[1] != num_queries:
                raise ValueError(f"face mask {height}x{width} does not tile an attention map of {num_queries} queries")
            self._resized[key] = [torch.nonzero(row).reshape(-1).to(device) for row in resized]
        return self._resized[key]


class IdentityNet(ControlNetModel):
    """InstantID's ControlNet: its cross-attention context is the 16 face tokens, not the text.

    The SDXL ControlNet pipeline hands every ControlNet the text embeddings; this subclass replaces
    them with the face tokens set by `conditioned(...)` for one call (pooled text and time ids still
    arrive in `added_cond_kwargs`). With a face region each residual is multiplied by the region at its
    resolution. With several people the tokens hold each person's in turn, and `person(i)` is the net as
    person i sees it: their tokens, their keypoint image, their region (diffusers' MultiControlNetModel
    sums the people's residuals). Extra ControlNets (pose/canny/depth) keep getting the text.
    """

    _face_tokens: torch.Tensor | None = None
    _region: FaceRegion | None = None

    @contextlib.contextmanager
    def conditioned(self, face_tokens: torch.Tensor, region: FaceRegion | None = None) -> Iterator[IdentityNet]:
        """face_tokens: [2B or B, people x num_tokens, cross_dim] (negative first under CFG; person 0's tokens
        first). `region`: one mask per person, or None (one person, no gate)."""
        self._face_tokens, self._region = face_tokens, region
        try:
            yield self
        finally:
            self._face_tokens, self._region = None, None

    def person(self, index: int) -> PersonNet:
        return PersonNet(self, index)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0, *args,
                return_dict: bool = True, person: int = 0, **kwargs):
        if self._face_tokens is None:
            raise RuntimeError("IdentityNet called without face tokens: call it inside `identitynet.conditioned(...)`.")
        tokens = self._face_tokens
        if tokens.shape[0] != sample.shape[0]:  # no CFG this call: only the positive half is used
            tokens = tokens[-sample.shape[0]:]
        people = 1 if self._region is None else self._region.people
        if people > 1:  # each person's tokens, in person order (as the IP attention splits them)
            count = tokens.shape[1] // people
            tokens = tokens[:, person * count:(person + 1) * count]
        down, mid = super().forward(sample, timestep, tokens.to(sample.device, parameter_dtype(self)), controlnet_cond,
                                    conditioning_scale, *args, return_dict=False, **kwargs)
        if self._region is not None:
            down = [residual * self._region.residual_weight(residual, person) for residual in down]
            mid = mid * self._region.residual_weight(mid, person)
        return (down, mid) if not return_dict else ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)


class PersonNet(torch.nn.Module):
    """The IdentityNet as one person sees it, for a slot of diffusers' MultiControlNetModel (which gives each
    slot its own image, here the person's keypoints, and sums the slots' residuals). Shares the weights."""

    def __init__(self, identitynet: IdentityNet, person: int):
        super().__init__()
        self.identitynet, self.index = identitynet, person

    @property
    def config(self):
        return self.identitynet.config

    def forward(self, *args, **kwargs):
        return self.identitynet(*args, person=self.index, **kwargs)


class FaceRegionIPAttnProcessor(IPAdapterAttnProcessor2_0):
    """diffusers' SDPA IP-Adapter processor with the official face-region arithmetic.

    Written here because diffusers resizes `ip_adapter_masks` *bicubically* in every attention call
    (official: nearest, 4.8 % apart in the final latents at 1024 px) and because that per-call resize
    and the separate mask/scale/add kernels cost launches on every layer of every step. Being an
    IPAdapterAttnProcessor2_0, it keeps diffusers' weights, `set_ip_adapter_scale` and unloading; any
    case it does not cover (attention masks, spatial/group norm, several adapters) goes to diffusers.
    Output = to_out(text attention + scale x region x IP attention), one SDPA call each; as the region
    is 0 outside the face box, the IP attention is computed for the positions inside it only. With several
    people, the positions of person i's region attend to person i's tokens only, and others to none. Inside
    `face_conditioning` the keys and values of the text and of the face tokens, which do not change
    between steps, are computed at the first step and reused (the outputs are the same numbers).
    """

    region: FaceRegion | None = None
    cache: dict | None = None  # per pipeline call: (what, data_ptr) -> (key, value)

    def _key_value(self, what: str, states: torch.Tensor, to_k, to_v) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None:
            return to_k(states), to_v(states)
        slot = (what, states.data_ptr(), tuple(states.shape))
        if slot not in self.cache:
            self.cache[slot] = (to_k(states), to_v(states))
        return self.cache[slot]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 scale: float = 1.0, ip_adapter_masks=None):
        ours = (isinstance(encoder_hidden_states, tuple) and len(self.scale) == 1 and not isinstance(self.scale[0], list)
                and attention_mask is None and ip_adapter_masks is None and hidden_states.ndim == 3
                and attn.spatial_norm is None and attn.group_norm is None and not attn.norm_cross)
        if not ours:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, scale,
                                    ip_adapter_masks)
        text, (face_tokens,) = encoder_hidden_states
        batch, queries, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key, value = self._key_value("text", text, attn.to_k, attn.to_v)
        head_dim = key.shape[-1] // attn.heads

        def heads(states: torch.Tensor) -> torch.Tensor:
            return states.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query = heads(query)
        out = F.scaled_dot_product_attention(query, heads(key), heads(value))
        ip_scale = self.scale[0]
        if ip_scale != 0:
            tokens = face_tokens.reshape(batch, -1, face_tokens.shape[-1])
            ip_key, ip_value = self._key_value("face", tokens, self.to_k_ip[0], self.to_v_ip[0])
            ip_key, ip_value = heads(ip_key), heads(ip_value * ip_scale)  # attention is linear in the values
            if self.region is None:
                out = out + F.scaled_dot_product_attention(query, ip_key, ip_value)
            else:  # the official mask is 0 outside the face: attend from the face's positions only
                count = ip_key.shape[2] // self.region.people  # each person's tokens, in person order
                for person, rows in enumerate(self.region.attention_rows(queries, query.device)):
                    if rows.numel():
                        keys = slice(person * count, (person + 1) * count)
                        out.index_add_(2, rows, F.scaled_dot_product_attention(
                            query.index_select(2, rows), ip_key[:, :, keys], ip_value[:, :, keys]))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def use_face_region_processors(unet) -> list[FaceRegionIPAttnProcessor]:
    """Swap diffusers' SDPA IP processors for FaceRegionIPAttnProcessor, sharing their weights; returns them."""
    processors = {}
    for name, processor in unet.attn_processors.items():
        if type(processor) is IPAdapterAttnProcessor2_0:
            replacement = FaceRegionIPAttnProcessor(processor.hidden_size, processor.cross_attention_dim,
                                                    processor.num_tokens, processor.scale)
            replacement.to_k_ip, replacement.to_v_ip = processor.to_k_ip, processor.to_v_ip
            processor = replacement
        processors[name] = processor
    ours = [p for p in processors.values() if isinstance(p, FaceRegionIPAttnProcessor)]
    unet.set_attn_processor(processors)  # empties the dict it is given
    return ours


@contextlib.contextmanager
def face_conditioning(unet, processors: list[FaceRegionIPAttnProcessor], tokens: torch.Tensor,
                      region: FaceRegion | None) -> Iterator[None]:
    """For one pipeline call: the precomputed face tokens instead of the Resampler at every step, the face
    region (None: no gate) on `processors` (what use_face_region_processors returned), and their
    per-call key/value caches."""
    for processor in processors:
        processor.region, processor.cache = region, {}
    try:
        with tokens_for_the_call(unet, tokens):
            yield
    finally:
        for processor in processors:
            processor.region, processor.cache = None, None


def face_tokens(unet, embeds: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Resampler output [batch, tokens, cross_dim] on `device` for embeds [batch, 1, seq, 512] (diffusers' layout).

    Runs where the Resampler's weights are now (with offload hooks that is not the execution device;
    the official code breaks there), then moves the tokens to the execution device.
    """
    projection = unet.encoder_hid_proj
    parameter = next(projection.parameters())
    with torch.no_grad():
        tokens = projection([embeds.to(device if parameter.is_meta else parameter.device, parameter.dtype)])[0]
    return tokens[:, 0].to(device)


@dataclass
class InstantIDEngine:
    """InstantID's modules, loaded with the pipeline: the IdentityNet (the pipeline's ControlNet), the Resampler
    (the UNet's `encoder_hid_proj`) and the face-region IP processors (always on the UNet)."""

    identitynet: IdentityNet
    processors: list[FaceRegionIPAttnProcessor]

    lora_adapters = None
    photo_side = WORKING_SIDE

    def conditioning(self, call: EngineCall) -> Conditioning:
        """Each person's face tokens (computed once), their keypoint images through the IdentityNet, and the face
        region gating both; the IP attention at the adapter strength."""
        values, unet = call.values, call.pipe.unet
        pairs = [embedding_pair(embedding, (1, 1, -1, 512), values["negative_noise"], call.do_cfg, call.generator)
                 for embedding in call.cast.embeddings]  # per person: (negative, positive) embeddings
        tokens = torch.cat([face_tokens(unet, per_image(pair, call.num), call.device) for pair in pairs],
                           dim=1)  # per person face tokens [batch, 16, dim], person 0's first
        region = None if call.cast.masks is None else FaceRegion(torch.from_numpy(call.cast.masks))
        for processor in self.processors:  # what set_ip_adapter_scale does, without walking the UNet again
            processor.scale = [values["adapter_strength"]]
        kps_images, strength = call.cast.kps_images(), values["identitynet_strength"]
        slots = ([ControlSlot(self.identitynet.person(index), image, strength) for index, image in enumerate(kps_images)]
                 if call.several_people else [ControlSlot(self.identitynet, kps_images[0], strength)])
        return Conditioning({"ip_adapter_image_embeds": [pairs[0].to(call.dtype)]},
                            self._conditioned(unet, tokens, region), slots)

    @contextlib.contextmanager
    def _conditioned(self, unet, tokens: torch.Tensor, region: FaceRegion | None) -> Iterator[None]:
        with self.identitynet.conditioned(tokens, region), face_conditioning(unet, self.processors, tokens, region):
            yield

    def describe(self, values: dict) -> dict:
        return {}

    def where(self) -> str:
        return "instantid: IdentityNet and face adapter, loaded with the pipeline (the default)"

    def to(self, device: str) -> None:
        """Its layers are the pipeline's own (the memory plan places them)."""

    def release(self, pipe) -> None:
        """Never released: the pipeline is built on it."""
