"""IP-Adapter FaceID Plus V2 (`--identity faceid-plusv2`) against h94's code, restated, on the smoke SDXL.

Sources, tencent-ailab/IP-Adapter: `ip_adapter/ip_adapter_faceid.py` (`IPAdapterFaceIDPlus(XL)`: `ProjPlusModel`,
`FacePerceiverResampler`, `set_ip_adapter`, `get_image_embeds` with the CLIP states of the zero image as the
negative, `generate`: the 4 face tokens appended to the text tokens of an SDXL pipeline call),
`ip_adapter/attention_processor_faceid.py` (`LoRAAttnProcessor`, `LoRAIPAttnProcessor`: a LoRA on q/k/v/out of
every attention at `lora_scale` 1, IP attention added with `scale`), `ip_adapter/resampler.py` (PerceiverAttention).
Shared by both sides, so not covered here: the face detection and buffalo_l embedding (insightface), the 224 px
aligned crop and CLIP image processor, and the text embeddings (diffusers' `encode_prompt`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from torch import nn

from instantid_colab import memory, pipeline, smoke
from instantid_colab.engines import faceid
from instantid_colab.adapter import AdapterError
from instantid_colab.settings import SettingsError
from tests.latents import generate_with_latents, relative_difference
from tests.test_official_equivalence import PerceiverAttention, block_hidden_size

TOLERANCE = 1e-5

# ---------------------------------------------------------------------------------------------
# ip_adapter_faceid.py and attention_processor_faceid.py, restated


class FacePerceiverResampler(nn.Module):
    def __init__(self, dim, depth, dim_head, heads, embedding_dim, output_dim, ff_mult):
        super().__init__()
        self.proj_in, self.proj_out = nn.Linear(embedding_dim, dim), nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                                         nn.Linear(dim * ff_mult, dim, bias=False))])
            for _ in range(depth))

    def forward(self, latents, x):
        x = self.proj_in(x)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ProjPlusModel(nn.Module):
    def __init__(self, cross_attention_dim, id_embeddings_dim=512, clip_embeddings_dim=1280, num_tokens=4):
        super().__init__()
        self.cross_attention_dim, self.num_tokens = cross_attention_dim, num_tokens
        self.proj = nn.Sequential(nn.Linear(id_embeddings_dim, id_embeddings_dim * 2), nn.GELU(),
                                  nn.Linear(id_embeddings_dim * 2, cross_attention_dim * num_tokens))
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            dim=cross_attention_dim, depth=4, dim_head=64, heads=cross_attention_dim // 64,
            embedding_dim=clip_embeddings_dim, output_dim=cross_attention_dim, ff_mult=4)

    def forward(self, id_embeds, clip_embeds, shortcut=False, scale=1.0):
        x = self.norm(self.proj(id_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim))
        out = self.perceiver_resampler(x, clip_embeds)
        return x + scale * out if shortcut else out


class LoRALinearLayer(nn.Module):
    """diffusers.models.lora.LoRALinearLayer as the official processors build it (no network_alpha: no rescale)."""

    def __init__(self, in_features, out_features, rank):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, hidden_states):
        return self.up(self.down(hidden_states))


class LoRAAttnProcessor(nn.Module):
    def __init__(self, hidden_size, cross_attention_dim=None, rank=4):
        super().__init__()
        self.lora_scale = 1.0
        self.to_q_lora = LoRALinearLayer(hidden_size, hidden_size, rank)
        self.to_k_lora = LoRALinearLayer(cross_attention_dim or hidden_size, hidden_size, rank)
        self.to_v_lora = LoRALinearLayer(cross_attention_dim or hidden_size, hidden_size, rank)
        self.to_out_lora = LoRALinearLayer(hidden_size, hidden_size, rank)

    def lora(self, layer, name, states):
        return layer(states) + self.lora_scale * getattr(self, name)(states)

    def attend(self, attn, query, key, value):
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        return attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(query, key, None), value))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = self.lora(attn.to_q, "to_q_lora", hidden_states)
        hidden = self.attend(attn, query, self.lora(attn.to_k, "to_k_lora", context),
                             self.lora(attn.to_v, "to_v_lora", context))
        return attn.to_out[1](self.lora(attn.to_out[0], "to_out_lora", hidden)) / attn.rescale_output_factor


class LoRAIPAttnProcessor(LoRAAttnProcessor):
    def __init__(self, hidden_size, cross_attention_dim, scale, rank, num_tokens):
        super().__init__(hidden_size, cross_attention_dim, rank)
        self.scale, self.num_tokens = scale, num_tokens
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        end = encoder_hidden_states.shape[1] - self.num_tokens
        text, ip_tokens = encoder_hidden_states[:, :end], encoder_hidden_states[:, end:]
        query = self.lora(attn.to_q, "to_q_lora", hidden_states)
        hidden = self.attend(attn, query, self.lora(attn.to_k, "to_k_lora", text), self.lora(attn.to_v, "to_v_lora", text))
        hidden = hidden + self.scale * self.attend(attn, query, self.to_k_ip(ip_tokens), self.to_v_ip(ip_tokens))
        return attn.to_out[1](self.lora(attn.to_out[0], "to_out_lora", hidden)) / attn.rescale_output_factor


def official_processors(unet, rank: int) -> dict:
    """`set_ip_adapter`: attn1 -> LoRAAttnProcessor, every other -> LoRAIPAttnProcessor (hidden size of its block)."""
    return {name: LoRAAttnProcessor(block_hidden_size(unet, name), None, rank) if name.endswith("attn1.processor") else
            LoRAIPAttnProcessor(block_hidden_size(unet, name), unet.config.cross_attention_dim, 1.0, rank, 4)
            for name in unet.attn_processors}


@dataclasses.dataclass
class Official:
    pipe: StableDiffusionXLPipeline  # the session's modules around the base UNet with the official processors
    projection: ProjPlusModel
    engine: faceid.FaceIDEngine  # for its image encoder, image processor and recogniser (shared by both sides)


def load_official(session, files: faceid.FaceIDFiles) -> Official:
    """`load_ip_adapter`: the projection and the processors, each loaded strictly from the file's groups."""
    state = torch.load(files.adapter, map_location="cpu", weights_only=True)
    unet = UNet2DConditionModel.from_pretrained(session.weights.base, subfolder="unet")
    rank = state["ip_adapter"]["0.to_q_lora.down.weight"].shape[0]
    unet.set_attn_processor(official_processors(unet, rank))
    nn.ModuleList(unet.attn_processors.values()).load_state_dict(state["ip_adapter"])
    engine = session.identity_engine("faceid-plusv2")
    projection = ProjPlusModel(unet.config.cross_attention_dim, clip_embeddings_dim=engine.image_encoder.config.hidden_size)
    projection.load_state_dict(state["image_proj"])
    components = {k: v for k, v in session.pipe.components.items() if k not in ("unet", "controlnet")}
    pipe = StableDiffusionXLPipeline(**{**components, "unet": unet.eval()}, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return Official(pipe, projection.eval(), engine)


@torch.no_grad()
def official_latents(official: Official, session, photo, settings: dict, shortcut: bool = True) -> torch.Tensor:
    """`IPAdapterFaceIDPlusXL.generate(face_image=crop, faceid_embeds=..., shortcut=True, s_scale=...)`."""
    engine, num = official.engine, settings["num_images"]
    face = session.faces.detect(photo)
    embedding = engine.recogniser.get(np.asarray(photo)[:, :, ::-1].copy(), face)
    faceid_embeds = torch.from_numpy(embedding / np.linalg.norm(embedding)).float()[None]
    crop = engine.face_crops(session.faces, [photo])[0]
    clip_image = engine.feature_extractor(images=crop, return_tensors="pt").pixel_values
    clip_states = engine.image_encoder(clip_image, output_hidden_states=True).hidden_states[-2]
    uncond_states = engine.image_encoder(torch.zeros_like(clip_image), output_hidden_states=True).hidden_states[-2]
    s_scale = settings["identity_settings"]["s_scale"]
    tokens = official.projection(faceid_embeds, clip_states, shortcut=shortcut, scale=s_scale)
    uncond = official.projection(torch.zeros_like(faceid_embeds), uncond_states, shortcut=shortcut, scale=s_scale)
    tokens, uncond = (t.repeat(1, num, 1).view(num, t.shape[1], -1) for t in (tokens, uncond))
    for processor in official.pipe.unet.attn_processors.values():
        if isinstance(processor, LoRAIPAttnProcessor):
            processor.scale = settings["adapter_strength"]  # set_scale(scale)
    text, negative, pooled, negative_pooled = official.pipe.encode_prompt(
        settings["prompt"], num_images_per_prompt=num, do_classifier_free_guidance=True,
        negative_prompt=settings["negative_prompt"], device="cpu")
    official.pipe.scheduler = pipeline._make_scheduler(settings["scheduler"], session.scheduler_config)
    return official.pipe(prompt_embeds=torch.cat([text, tokens], dim=1),
                         negative_prompt_embeds=torch.cat([negative, uncond], dim=1),
                         pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled,
                         guidance_scale=settings["guidance_scale"], num_inference_steps=settings["steps"],
                         generator=torch.Generator("cpu").manual_seed(settings["seed"]), width=settings["width"],
                         height=settings["height"], output_type="latent").images


# ---------------------------------------------------------------------------------------------
# Ours against it


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    weights = smoke.build_smoke_weights(tmp_path_factory.mktemp("faceid") / "smoke")
    session = pipeline.load_pipeline(weights, memory.choose_plan(16, None), progress=False)
    return session, load_official(session, faceid.ensure_files(weights, offline=True))


CASES = {
    "card defaults": dict(),
    "s_scale 0.4, strength 1.3": dict(s_scale=0.4, adapter_strength=1.3),
    "two images, guidance 3": dict(num_images=2, guidance_scale=3.0),
}


@pytest.mark.parametrize("case", CASES)
def test_faceid_equals_the_official_algorithm(setup, monkeypatch, case):
    session, official = setup
    settings = {**dict(width=128, height=128, steps=3, seed=5, guidance_scale=5.0, adapter_strength=1.0), **CASES[case]}
    photo = smoke.sample_face_image(256)
    result, latents = generate_with_latents(session, monkeypatch, photo, "a portrait", identity="faceid-plusv2",
                                            **settings)
    expected = official_latents(official, session, photo, result.settings)
    assert latents.shape == expected.shape == (settings.get("num_images", 1), 4, 16, 16)
    assert relative_difference(latents, expected) < TOLERANCE


def test_the_comparison_sees_plus_v1(setup, monkeypatch):
    """Without the V2 shortcut (FaceID Plus V1's projection) the latents differ: the test above can fail."""
    session, official = setup
    photo = smoke.sample_face_image(256)
    result, latents = generate_with_latents(session, monkeypatch, photo, "a portrait", identity="faceid-plusv2",
                                            width=128, height=128, steps=3, seed=5, adapter_strength=1.0)
    wrong = official_latents(official, session, photo, result.settings, shortcut=False)
    assert relative_difference(latents, wrong) > 100 * TOLERANCE


def test_instantid_is_unchanged_by_a_faceid_picture(setup, monkeypatch):
    """The methods share the UNet: after a FaceID picture (its processors, projection and LoRA in and out), an
    InstantID picture is what it was before, and its metadata names its engine."""
    session, _ = setup
    photo = smoke.sample_face_image(256)
    kwargs = dict(width=128, height=128, steps=3, seed=7)
    before, latents_before = generate_with_latents(session, monkeypatch, photo, "a portrait", **kwargs)
    generate_with_latents(session, monkeypatch, photo, "a portrait", identity="faceid-plusv2", **kwargs)
    after, latents_after = generate_with_latents(session, monkeypatch, photo, "a portrait", **kwargs)
    assert torch.equal(latents_before, latents_after)
    assert before.settings["identity_engine"] == after.settings["identity_engine"] == "instantid"
    assert session.pipe.get_list_adapters()["unet"] == ["faceid_0"] and session.loras.active == {}


def test_faceid_metadata_names_engine_settings_and_files(setup):
    session, _ = setup
    result = pipeline.generate(session, smoke.sample_face_image(256), "a portrait", identity="faceid-plusv2",
                               s_scale=0.7, width=128, height=128, steps=2)
    metadata = result.image_metadata(0)
    assert metadata["identity_engine"] == "faceid-plusv2"
    assert metadata["identity_settings"]["s_scale"] == 0.7
    assert "h94/IP-Adapter-FaceID/ip-adapter-faceid-plusv2_sdxl.bin" in metadata["identity_settings"]["model_files"]
    assert metadata["identitynet_strength"] is None and metadata["enhance_non_face"] is None


@pytest.mark.parametrize("kwargs, said", [
    (dict(pose_image="photo"), "has no keypoint layout"),
    (dict(init_image="photo"), "does not start from a photo"),
    (dict(combine="concat", extra_face_images=["photo"]), "not concat"),
    (dict(s_scale=4), "s_scale 4.0 is out of range: use 0 to 3"),
    (dict(identity="photomaker"), "identity 'photomaker' is not one of: instantid, faceid-plusv2, pulid"),
])
def test_what_faceid_cannot_do_is_refused(setup, kwargs, said):
    session, _ = setup
    photo = smoke.sample_face_image(256)
    kwargs = {key: photo if value == "photo" else [photo] if value == ["photo"] else value for key, value in kwargs.items()}
    with pytest.raises(SettingsError, match=said):
        pipeline.generate(session, photo, "a portrait", **{"identity": "faceid-plusv2", **kwargs})


def test_people_are_refused_with_faceid(setup):
    from instantid_colab.people import Person

    session, _ = setup
    people = [Person([smoke.sample_face_image(256)]), Person([smoke.sample_face_image(256, (150, 210, 240))])]
    with pytest.raises(SettingsError, match="makes one person"):
        pipeline.generate(session, None, "two people", people=people, identity="faceid-plusv2")


def test_a_file_that_does_not_fit_names_its_keys(setup, tmp_path):
    session, _ = setup
    files = session.identity_engine("faceid-plusv2").files
    state = torch.load(files.adapter, weights_only=True)
    state["image_proj"]["proj.2.weight"] = state["image_proj"]["proj.2.weight"][:, :100]
    del state["ip_adapter"]["1.to_k_ip.weight"]
    with pytest.raises(AdapterError) as error:
        faceid.check_fits(state, session.pipe.unet, session.identity_engine("faceid-plusv2").image_encoder.config.hidden_size, "bad.bin")
    message = str(error.value)
    assert "image_proj.proj.2.weight: expected [256, 1024], file has [256, 100]" in message
    assert "ip_adapter.missing 1.to_k_ip.weight [64, 64]" in message
    assert "h94/IP-Adapter-FaceID ip-adapter-faceid-plusv2_sdxl.bin" in message


# ---------------------------------------------------------------------------------------------
# Every entry point


def test_the_command_line_writes_a_faceid_png_and_refuses_what_it_cannot_do(tmp_path, capsys):
    import json

    from PIL import Image

    from instantid_colab import cli

    out = tmp_path / "faceid.png"
    assert cli.main(["generate", "--smoke", "--identity", "faceid-plusv2", "--s-scale", "0.6", "--steps", "2",
                     "--weights-dir", str(tmp_path / "weights"), "--out", str(out)]) == 0
    metadata = json.loads(Image.open(out).text["instantid"])
    assert (metadata["identity_engine"], metadata["identity_settings"]["s_scale"]) == ("faceid-plusv2", 0.6)
    assert metadata["label"] == "smoke: random weights"
    capsys.readouterr()
    photo = tmp_path / "pose.png"
    smoke.sample_face_image(256).save(photo)
    code = cli.main(["generate", "--smoke", "--identity", "faceid-plusv2", "--pose", str(photo), "--refine-face",
                     "--weights-dir", str(tmp_path / "not-made"), "--out", str(tmp_path / "no.png")])
    said = capsys.readouterr().err
    assert code == 2 and "has no keypoint layout" in said and "refine_face repaints faces through InstantID" in said
    assert not (tmp_path / "not-made").exists()  # refused before any weights were written or loaded


def test_the_identity_is_a_bench_grid_dimension_and_a_manifest_column(tmp_path):
    from instantid_colab import batch
    from instantid_colab.bench.grid import parse_grid

    grid = parse_grid("identity=instantid,faceid-plusv2; s_scale=1")
    assert [c.values for c in grid] == [{"identity": "instantid", "s_scale": "1"}, {"identity": "faceid-plusv2", "s_scale": "1"}]
    smoke.sample_face_image(256).save(tmp_path / "face.png")
    (tmp_path / "rows.csv").write_text("face,identity,s_scale,refine_face\nface.png,faceid-plusv2,0.5,\n"
                                       "face.png,faceid-plusv2,0.5,0.4\n")
    with pytest.raises(batch.ManifestError) as error:
        batch.prepare_rows(tmp_path / "rows.csv", smoke=True)
    assert "row 2" in str(error.value) and "refine_face repaints faces" in str(error.value)
    (tmp_path / "rows.csv").write_text("face,identity,s_scale\nface.png,faceid-plusv2,0.5\n")
    (row,) = batch.prepare_rows(tmp_path / "rows.csv", smoke=True)
    assert (row.values["identity"], row.values["s_scale"]) == ("faceid-plusv2", 0.5)


def test_out_of_memory_with_faceid_steps_down_past_the_plans_it_cannot_run_under(setup, monkeypatch):
    """From model offload the next plans stream the UNet in blocks; FaceID says so instead of breaking there."""
    session, _ = setup
    session.identity_engine("faceid-plusv2")
    offload = dataclasses.replace(session.plan, placement="model_offload")
    steps = {"model_offload": dataclasses.replace(offload, placement="group_offload"),
             "group_offload": dataclasses.replace(offload, placement="sequential_offload"), "sequential_offload": None}
    monkeypatch.setattr(memory, "step_down", lambda plan: steps[plan.placement])
    monkeypatch.setattr(session, "plan", offload)

    def out_of_memory(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = session.pipe.unet.register_forward_pre_hook(out_of_memory)
    try:
        with pytest.raises(pipeline.OutOfMemory, match=r"lightest memory plan faceid-plusv2 runs under "
                                                        r"\(model_offload\).*or identity instantid"):
            pipeline.generate(session, smoke.sample_face_image(256), "a portrait", identity="faceid-plusv2",
                              width=128, height=128, steps=2)
    finally:
        handle.remove()
    assert session.plan.placement == "model_offload"


def test_faceid_runs_with_a_speed_mode_a_style_lora_and_an_extra_controlnet(setup, monkeypatch):
    """Its LoRA is on beside the speed mode's and the style LoRA for its call only; the canny net alone is the
    pipeline's ControlNet (no IdentityNet), fed its edge map."""
    from instantid_colab.controls import Control
    from instantid_colab.loras import Lora

    session, _ = setup
    seen, using = [], pipeline._using_controlnet
    monkeypatch.setattr(pipeline, "_using_controlnet", lambda caller, net: seen.append(net) or using(caller, net))
    photo = smoke.sample_face_image(256)
    result = pipeline.generate(session, photo, "a portrait", identity="faceid-plusv2", speed="lightning-4",
                               width=128, height=128, loras=[Lora("smoke", 0.5)],
                               controls=[Control("canny", smoke.sample_face_image(256), 0.5, 0.0, 1.0, False)])
    assert sorted(session.loras.active.values()) == [0.5, 1.0, 1.0] and session.loras.active["faceid_0"] == 1.0
    (net,) = seen
    assert type(net).__name__ == "ControlNetModel"  # the canny net alone, no IdentityNet
    assert result.settings["controls"][0]["model"] == "diffusers/controlnet-canny-sdxl-1.0"
    assert result.settings["speed"]["name"] == "lightning-4" and result.settings["steps"] == 4
    pipeline.generate(session, photo, "a portrait", width=128, height=128, steps=2)
    assert "faceid_0" not in session.loras.active


def test_a_damaged_faceid_file_is_named_with_how_to_fetch_it_again(setup, tmp_path):
    from instantid_colab.weights import DamagedWeightsError

    session, _ = setup
    files = session.identity_engine("faceid-plusv2").files
    damaged = tmp_path / faceid.ADAPTER_FILE
    damaged.write_bytes(files.adapter.read_bytes()[:5000])  # a download cut off
    with pytest.raises(DamagedWeightsError, match=rf"the FaceID adapter: {damaged} is damaged.*download --force"):
        faceid.load(session.pipe, dataclasses.replace(files, adapter=damaged))
