"""Our public `generate()` against the official InstantID algorithm, restated from its source.

Sources, instantX-research/InstantID: `ip_adapter/resampler.py` (IP-Adapter's Perceiver Resampler),
`ip_adapter/attention_processor.py` (AttnProcessor for attn1, IPAttnProcessor with `region_control`),
`pipeline_stable_diffusion_xl_instantid_full.py` (`__call__`: face tokens from the Resampler, the CFG
negative = Resampler(zeros), the IdentityNet fed the face tokens, the control mask resized bilinearly
per residual, the denoising loop). Everything runs in float32 on tiny random SDXL-structured nets;
the latents our pipeline hands to the VAE must equal the official computation within 1e-3 relative.

Shared by both sides, so not covered here: the text embeddings (both use diffusers' `encode_prompt`;
the official full pipeline's long-prompt weighting is not restated), face analysis and `draw_kps`
(tests/test_faces.py compares that with the official pixels).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor as DiffusersAttnProcessor
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from diffusers import ControlNetModel

from instantid_colab import faces, memory, pipeline, smoke
from instantid_colab.adapter import ResamplerConfig
from tests.latents import generate_with_latents, relative_difference

TOLERANCE = 1e-3
NUM_TOKENS = 16
# A tiny Resampler that diffusers' IPAdapterPlusImageProjection can hold (depth 4, 64-wide heads), 2 heads.
RESAMPLER = ResamplerConfig(dim=128, depth=4, dim_head=64, heads=2, num_queries=NUM_TOKENS, embedding_dim=512,
                            output_dim=64, ff_mult=4)

# ---------------------------------------------------------------------------------------------
# ip_adapter/resampler.py, restated


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * heads * 2, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        batch, length, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.view(batch, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))  # on q and k each, "more stable with f16"
        weight = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1).type(q.dtype)
        return self.to_out((weight @ v).permute(0, 2, 1, 3).reshape(batch, length, -1))


class Resampler(nn.Module):
    def __init__(self, dim, depth, dim_head, heads, num_queries, embedding_dim, output_dim, ff_mult):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim, dim_head, heads),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                              nn.Linear(dim * ff_mult, dim, bias=False)),
            ])
            for _ in range(depth)
        )

    def forward(self, x):
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


# ---------------------------------------------------------------------------------------------
# ip_adapter/attention_processor.py, restated (the non-xformers path)


class RegionControl:
    """The official module-level `region_control`: the face box at output size, or None."""

    region_mask: torch.Tensor | None = None


class AttnProcessor(nn.Module):
    """The official attn1 processor: diffusers' AttnProcessor as an nn.Module (a ModuleList numbers the
    file's ip_adapter keys by position, so every processor must be a module)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return DiffusersAttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class IPAttnProcessor(nn.Module):
    def __init__(self, hidden_size: int, cross_attention_dim: int, scale: float, num_tokens: int):
        super().__init__()
        self.scale, self.num_tokens = scale, num_tokens
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        query = attn.to_q(hidden_states)
        end = encoder_hidden_states.shape[1] - self.num_tokens
        text, ip_tokens = encoder_hidden_states[:, :end], encoder_hidden_states[:, end:]
        query = attn.head_to_batch_dim(query)
        key, value = attn.head_to_batch_dim(attn.to_k(text)), attn.head_to_batch_dim(attn.to_v(text))
        hidden = attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(query, key, None), value))
        ip_key = attn.head_to_batch_dim(self.to_k_ip(ip_tokens))
        ip_value = attn.head_to_batch_dim(self.to_v_ip(ip_tokens))
        ip_hidden = attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(query, ip_key, None), ip_value))
        region_mask = RegionControl.region_mask
        if region_mask is not None:
            h, w = region_mask.shape[:2]
            ratio = (h * w / query.shape[1]) ** 0.5
            ip_hidden = ip_hidden * F.interpolate(region_mask[None, None], scale_factor=1 / ratio,
                                                  mode="nearest").reshape([1, -1, 1])
        hidden = hidden + self.scale * ip_hidden
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        return hidden / attn.rescale_output_factor


def block_hidden_size(unet, name: str) -> int:
    """The official `set_ip_adapter`'s hidden size for attention processor `name`: its block's channels."""
    channels = unet.config.block_out_channels
    if name.startswith("mid_block"):
        return channels[-1]
    if name.startswith("up_blocks"):
        return list(reversed(channels))[int(name[len("up_blocks.")])]
    return channels[int(name[len("down_blocks.")])]


def official_processors(unet, scale: float) -> dict:
    """`set_ip_adapter`: attn1 -> AttnProcessor, every other attention -> IPAttnProcessor(hidden size of its block)."""
    return {name: AttnProcessor() if name.endswith("attn1.processor") else
            IPAttnProcessor(block_hidden_size(unet, name), unet.config.cross_attention_dim, scale, NUM_TOKENS)
            for name in unet.attn_processors}


# ---------------------------------------------------------------------------------------------
# Loading (`load_ip_adapter_instantid`) and the denoising loop (the full pipeline's `__call__`), restated


@dataclasses.dataclass
class Official:
    unet: UNet2DConditionModel  # the base UNet with the official processors and the file's ip_adapter weights
    resampler: Resampler  # with the file's image_proj weights


def official_unet(base: str) -> UNet2DConditionModel:
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    unet.set_attn_processor(official_processors(unet, scale=0.5))
    return unet


def write_official_adapter(path, base: str, seed: int = 0) -> None:
    """An `ip-adapter.bin` saved from the restated classes, as InstantID's training saves it."""
    torch.manual_seed(seed)
    resampler = Resampler(**dataclasses.asdict(RESAMPLER))
    ip_layers = nn.ModuleList(official_unet(base).attn_processors.values())
    with torch.no_grad():
        for module in resampler.modules():
            if isinstance(module, nn.LayerNorm):  # not the identity init, so swapped norms would show
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
        for parameter in ip_layers.parameters():
            parameter.mul_(4.0)  # IP attention strong enough that the face region visibly matters
    torch.save({"image_proj": resampler.state_dict(), "ip_adapter": ip_layers.state_dict()}, path)


def load_official(base: str, adapter_file) -> Official:
    """Resampler and IP processors built with the official arguments, both loaded strictly."""
    state = torch.load(adapter_file, map_location="cpu", weights_only=True)
    resampler = Resampler(**dataclasses.asdict(RESAMPLER))
    resampler.load_state_dict(state["image_proj"])
    unet = official_unet(base)
    nn.ModuleList(unet.attn_processors.values()).load_state_dict(state["ip_adapter"])
    return Official(unet.eval(), resampler.eval())


def control_mask_weights(mask: torch.Tensor, residuals, mode: str) -> list[torch.Tensor]:
    """`F.interpolate(mask, (h // scale, w // scale), mode='bilinear')` per residual. The official list of
    scales is SDXL's residual strides ([8]*3 + [16]*3 + [32]*3); the tiny net has its own strides."""
    height, width = mask.shape[-2:]
    scales = [height // residual.shape[-2] for residual in residuals]
    return [F.interpolate(mask, (height // scale, width // scale), mode=mode) for scale in scales]


@torch.no_grad()
def official_latents(official: Official, session, embedding: np.ndarray, kps_image, bbox, settings: dict,
                     residual_mode: str = "bilinear") -> torch.Tensor:
    pipe, height, width = session.pipe, settings["height"], settings["width"]
    num, guidance, steps = settings["num_images"], settings["guidance_scale"], settings["steps"]
    do_cfg = guidance > 1
    for processor in official.unet.attn_processors.values():
        if isinstance(processor, IPAttnProcessor):
            processor.scale = settings["adapter_strength"]  # what `ip_adapter_scale=` does

    prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=settings["prompt"], device="cpu", num_images_per_prompt=num, do_classifier_free_guidance=do_cfg,
        negative_prompt=settings["negative_prompt"])
    # _encode_prompt_image_emb: [1, N, 512]; the CFG negative is zeros, also through the Resampler; repeated per image.
    image_emb = torch.as_tensor(embedding, dtype=torch.float32).reshape(1, -1, 512)
    image_emb = torch.cat([torch.zeros_like(image_emb), image_emb]) if do_cfg else image_emb
    face_tokens = official.resampler(image_emb)
    face_tokens = face_tokens.repeat(1, num, 1).view(face_tokens.shape[0] * num, NUM_TOKENS, -1)
    image = pipe.prepare_image(image=kps_image, width=width, height=height, batch_size=num, num_images_per_prompt=num,
                               device="cpu", dtype=torch.float32, do_classifier_free_guidance=do_cfg)

    control_mask = None
    if settings["enhance_non_face"]:
        mask = np.zeros([height, width, 3])
        x1, y1, x2, y2 = (int(v) for v in bbox)
        mask[y1:y2, x1:x2] = 255
        control_mask = torch.from_numpy(mask[:, :, 0] / 255.0).float()[None, None]
        RegionControl.region_mask = torch.from_numpy(mask[:, :, 0]).float() / 255.0

    scheduler = EulerDiscreteScheduler.from_config(session.scheduler_config)
    scheduler.set_timesteps(steps, device="cpu")
    generator = torch.Generator("cpu").manual_seed(settings["seed"])
    latents = randn_tensor((num, 4, height // 8, width // 8), generator=generator, dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)  # original, crop, target
    if do_cfg:
        prompt_embeds = torch.cat([negative_embeds, prompt_embeds])
        pooled, time_ids = torch.cat([negative_pooled, pooled]), torch.cat([time_ids, time_ids])
    added = {"text_embeds": pooled, "time_ids": time_ids.repeat(num, 1)}
    context = torch.cat([prompt_embeds, face_tokens], dim=1)  # 77 text tokens + 16 face tokens
    try:
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
            # The IdentityNet's weights as a plain ControlNetModel, fed the face tokens.
            down, mid = ControlNetModel.forward(pipe.controlnet, model_input, t, encoder_hidden_states=face_tokens,
                                                controlnet_cond=image, conditioning_scale=settings["identitynet_strength"],
                                                added_cond_kwargs=added, return_dict=False)
            if control_mask is not None:
                weights = control_mask_weights(control_mask, down, residual_mode)
                down = [residual * weight for residual, weight in zip(down, weights)]
                mid = mid * weights[-1]
            noise = official.unet(model_input, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                                  mid_block_additional_residual=mid, added_cond_kwargs=added, return_dict=False)[0]
            if do_cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + guidance * (text - uncond)
            latents = scheduler.step(noise, t, latents, generator=generator, return_dict=False)[0]
    finally:
        RegionControl.region_mask = None
    return latents


# ---------------------------------------------------------------------------------------------
# Ours against it


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("equivalence")
    weights = smoke.build_smoke_weights(root / "smoke")
    adapter_file = root / "ip-adapter.bin"
    write_official_adapter(adapter_file, weights.base)
    session = pipeline.load_pipeline(dataclasses.replace(weights, adapter=adapter_file),
                                     memory.choose_plan(16, None), progress=False)
    return session, load_official(weights.base, adapter_file)


def ours(session, face_images, monkeypatch, **settings):
    """Our public generate(), and the latents it handed to the VAE."""
    return generate_with_latents(session, monkeypatch, face_images[0], "a portrait of a person",
                                 extra_face_images=face_images[1:], **settings)


def official_conditions(session, face_images, settings: dict):
    """Embedding, keypoint image and face box, as the official app computes them (largest face; box
    and keypoints scaled to the output size)."""
    detected = [session.faces.detect(image) for image in face_images]
    embedding = faces.combine_embeddings([face.embedding for face in detected], settings["combine"])
    width, height = settings["width"], settings["height"]
    source_width, source_height = face_images[0].size
    scale = np.array([width / source_width, height / source_height])
    kps = detected[0].kps * scale
    bbox = (detected[0].bbox.reshape(2, 2) * scale).reshape(-1)
    return embedding, faces.draw_kps((width, height), kps), bbox


FACE_COLORS = [(235, 200, 175), (150, 210, 240), (240, 170, 120)]
CASES = {
    "no mask": dict(enhance_non_face=False),
    "mask": dict(),
    "mask, strengths 1.2/0.5": dict(identitynet_strength=1.2, adapter_strength=0.5),
    "mask, strengths 0.3/1.4": dict(identitynet_strength=0.3, adapter_strength=1.4),
    "guidance 1 (no CFG)": dict(guidance_scale=1.0),
    "two images": dict(num_images=2),
    "three faces, concat": dict(faces=3, combine="concat"),
    "three faces, average": dict(faces=3, combine="average"),
    "1024 px": dict(width=1024, height=1024, steps=2),
}


@pytest.mark.parametrize("case", CASES)
def test_generate_equals_the_official_algorithm(setup, monkeypatch, case):
    session, official = setup
    settings = {"width": 128, "height": 128, "steps": 3, "seed": 11, "guidance_scale": 5.0, **CASES[case]}
    face_images = [smoke.sample_face_image(256, color) for color in FACE_COLORS[:settings.pop("faces", 1)]]
    result, latents = ours(session, face_images, monkeypatch, **settings)
    embedding, kps_image, bbox = official_conditions(session, face_images, result.settings)
    expected = official_latents(official, session, embedding, kps_image, bbox, result.settings)
    assert latents.shape == expected.shape == (result.settings["num_images"], 4, settings["height"] // 8,
                                               settings["width"] // 8)
    assert relative_difference(latents, expected) < TOLERANCE


def test_the_comparison_sees_a_wrong_face_region(setup, monkeypatch):
    """The nearest-resized residual mask (our earlier code) is caught, so the test above can fail."""
    session, official = setup
    face_images = [smoke.sample_face_image(256)]
    result, latents = ours(session, face_images, monkeypatch, width=128, height=128, steps=3, seed=11)
    embedding, kps_image, bbox = official_conditions(session, face_images, result.settings)
    wrong = official_latents(official, session, embedding, kps_image, bbox, result.settings, residual_mode="nearest")
    assert relative_difference(latents, wrong) > 10 * TOLERANCE
