"""PhotoMaker V2 against its official code, restated here from TencentARC/PhotoMaker (Apache-2.0).

Sources: `photomaker/model_v2.py` (MLP, FuseModule, QFormerPerceiver, PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken),
`photomaker/resampler.py` (FacePerceiverResampler, PerceiverAttention, FeedForward), `photomaker/pipeline.py`
(`load_photomaker_adapter`, `encode_prompt_with_trigger_word`, `__call__`: the text-only prompt, `start_merge_step`,
the loop) and `gradio_demo/app_v2.py` (`start_merge_step = int(style_strength_ratio / 100 * num_steps)`, at most 30).
One change for the smoke file: its text width (64) is below one 128-wide head, so the restated perceiver uses one head
of 64 there (`heads = width // 128` and 128 wide otherwise, as the official). Ours runs the same smoke files through
`pipeline.generate`; the identity tokens and the latents are compared.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from instantid_colab import memory, pipeline, settings, smoke
from instantid_colab.adapter import AdapterError
from instantid_colab.engines import photomaker
from instantid_colab.loras import activate
from instantid_colab.settings import SettingsError
from tests.latents import generate_with_latents, relative_difference
from tests.official_perceiver import FeedForward, PerceiverAttention

TOKENS_TOLERANCE, LATENTS_TOLERANCE = 1e-5, 1e-3


# ---------------------------------------------------------------------------------------------
# photomaker/resampler.py (its PerceiverAttention and FeedForward are IP-Adapter's: tests/official_perceiver.py) and
# model_v2.py, restated


class FacePerceiverResampler(nn.Module):
    def __init__(self, *, dim=768, depth=4, dim_head=64, heads=16, embedding_dim=1280, output_dim=768, ff_mult=4):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads),
                                                   FeedForward(dim=dim, mult=ff_mult)]) for _ in range(depth))

    def forward(self, latents, x):
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class MLP(nn.Module):
    def __init__(self, in_dim, out_dim, hidden_dim, use_residual=True):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1, self.fc2 = nn.Linear(in_dim, hidden_dim), nn.Linear(hidden_dim, out_dim)
        self.use_residual, self.act_fn = use_residual, nn.GELU()

    def forward(self, x):
        residual = x
        x = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return x + residual if self.use_residual else x


class QFormerPerceiver(nn.Module):
    def __init__(self, id_embeddings_dim, cross_attention_dim, num_tokens, embedding_dim=1024, ratio=4):
        super().__init__()
        self.num_tokens, self.cross_attention_dim = num_tokens, cross_attention_dim
        self.token_proj = nn.Sequential(nn.Linear(id_embeddings_dim, id_embeddings_dim * ratio), nn.GELU(),
                                        nn.Linear(id_embeddings_dim * ratio, cross_attention_dim * num_tokens))
        self.token_norm = nn.LayerNorm(cross_attention_dim)
        heads = max(cross_attention_dim // 128, 1)  # the smoke width is below one head: see the module docstring
        self.perceiver_resampler = FacePerceiverResampler(
            dim=cross_attention_dim, depth=4, dim_head=cross_attention_dim // heads, heads=heads,
            embedding_dim=embedding_dim, output_dim=cross_attention_dim, ff_mult=4)

    def forward(self, x, last_hidden_state):
        x = self.token_norm(self.token_proj(x).reshape(-1, self.num_tokens, self.cross_attention_dim))
        return x + 1.0 * self.perceiver_resampler(x, last_hidden_state)


class FuseModule(nn.Module):
    def __init__(self, embed_dim):
        super().__init__()
        self.mlp1 = MLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def fuse_fn(self, prompt_embeds, id_embeds):
        stacked_id_embeds = self.mlp1(torch.cat([prompt_embeds, id_embeds], dim=-1)) + prompt_embeds
        return self.layer_norm(self.mlp2(stacked_id_embeds))

    def forward(self, prompt_embeds, id_embeds, class_tokens_mask):
        id_embeds = id_embeds.to(prompt_embeds.dtype)
        num_inputs = class_tokens_mask.sum().unsqueeze(0)
        batch_size, max_num_inputs = id_embeds.shape[:2]
        seq_length = prompt_embeds.shape[1]
        flat_id_embeds = id_embeds.view(-1, id_embeds.shape[-2], id_embeds.shape[-1])
        valid_id_mask = torch.arange(max_num_inputs, device=flat_id_embeds.device)[None, :] < num_inputs[:, None]
        valid_id_embeds = flat_id_embeds[valid_id_mask.flatten()]
        prompt_embeds = prompt_embeds.view(-1, prompt_embeds.shape[-1])
        class_tokens_mask = class_tokens_mask.view(-1)
        valid_id_embeds = valid_id_embeds.view(-1, valid_id_embeds.shape[-1])
        image_token_embeds = prompt_embeds[class_tokens_mask]
        stacked_id_embeds = self.fuse_fn(image_token_embeds, valid_id_embeds)
        assert class_tokens_mask.sum() == stacked_id_embeds.shape[0]
        prompt_embeds.masked_scatter_(class_tokens_mask[:, None], stacked_id_embeds.to(prompt_embeds.dtype))
        return prompt_embeds.view(batch_size, seq_length, -1)


class OfficialIDEncoder(CLIPVisionModelWithProjection):
    """PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken, its vision config and widths those of the file given."""

    def __init__(self, vision: dict, width: int, projection_2: int, id_embeddings_dim=512):
        super().__init__(CLIPVisionConfig(**vision))
        self.fuse_module = FuseModule(width)
        self.visual_projection_2 = nn.Linear(vision["hidden_size"], projection_2, bias=False)
        self.num_tokens, self.cross_attention_dim = 2, width
        self.qformer_perceiver = QFormerPerceiver(id_embeddings_dim, width, self.num_tokens,
                                                  embedding_dim=vision["hidden_size"])

    def forward(self, id_pixel_values, prompt_embeds, class_tokens_mask, id_embeds):
        b, num_inputs, c, h, w = id_pixel_values.shape
        last_hidden_state = self.vision_model(id_pixel_values.view(b * num_inputs, c, h, w))[0]
        id_embeds = self.qformer_perceiver(id_embeds.view(b * num_inputs, -1), last_hidden_state)
        id_embeds = id_embeds.view(b, num_inputs, self.num_tokens, -1)
        return self.fuse_module(prompt_embeds, id_embeds, class_tokens_mask)


# ---------------------------------------------------------------------------------------------
# photomaker/pipeline.py, restated on the session's components


class OfficialPhotoMaker:
    def __init__(self, session, files):
        groups = photomaker.read_groups(files.adapter)
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "image_size": 224, "patch_size": 32, "projection_dim": 32}  # smoke.photomaker.TINY_VISION_L
        self.id_encoder = OfficialIDEncoder(vision, session.pipe.unet.config.cross_attention_dim,
                                            groups["id_encoder"]["visual_projection_2.weight"].shape[0])
        self.id_encoder.load_state_dict(groups["id_encoder"], strict=True)  # the file's keys are model_v2's
        self.session, self.trigger_word, self.num_tokens = session, "img", 2
        pipe = session.pipe
        self.tokenizer, self.tokenizer_2 = copy.deepcopy(pipe.tokenizer), copy.deepcopy(pipe.tokenizer_2)
        self.tokenizer.add_tokens([self.trigger_word], special_tokens=True)
        self.tokenizer_2.add_tokens([self.trigger_word], special_tokens=True)
        from instantid_colab.components import pil_image_processor

        self.id_image_processor = pil_image_processor("CLIPImageProcessor")()

    def encode_prompt_with_trigger_word(self, prompt, num_id_images):
        pipe = self.session.pipe
        image_token_id = self.tokenizer_2.convert_tokens_to_ids(self.trigger_word)
        prompt_embeds_list = []
        for tokenizer, text_encoder in zip([self.tokenizer, self.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2]):
            text_input_ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                                       truncation=True, return_tensors="pt").input_ids
            clean_index, clean_input_ids, class_token_index = 0, [], []
            for token_id in text_input_ids.tolist()[0]:
                if token_id == image_token_id:
                    class_token_index.append(clean_index - 1)
                else:
                    clean_input_ids.append(token_id)
                    clean_index += 1
            assert len(class_token_index) == 1
            class_token_index = class_token_index[0]
            class_token = clean_input_ids[class_token_index]
            clean_input_ids = (clean_input_ids[:class_token_index] + [class_token] * num_id_images * self.num_tokens
                               + clean_input_ids[class_token_index + 1:])
            max_len = tokenizer.model_max_length
            clean_input_ids = (clean_input_ids[:max_len] if len(clean_input_ids) > max_len else
                               clean_input_ids + [tokenizer.pad_token_id] * (max_len - len(clean_input_ids)))
            class_tokens_mask = torch.tensor([[class_token_index <= i < class_token_index + num_id_images
                                               * self.num_tokens for i in range(len(clean_input_ids))]])
            output = text_encoder(torch.tensor([clean_input_ids]), output_hidden_states=True)
            pooled_prompt_embeds = output[0]
            prompt_embeds_list.append(output.hidden_states[-2])
        return torch.concat(prompt_embeds_list, dim=-1), pooled_prompt_embeds, class_tokens_mask

    def identity(self, prompt, photos, id_embeds):
        """The fused prompt embeddings and their pooled vector, as `__call__` makes them."""
        prompt_embeds, pooled, class_tokens_mask = self.encode_prompt_with_trigger_word(prompt, len(photos))
        id_pixel_values = self.id_image_processor(photos, return_tensors="pt").pixel_values.unsqueeze(0)
        return self.id_encoder(id_pixel_values, prompt_embeds, class_tokens_mask, id_embeds.unsqueeze(0)), pooled

    @torch.no_grad()
    def inference(self, settings, photos, id_embeds, start_merge_step):
        pipe, num = self.session.pipe, settings["num_images"]
        prompt = settings["prompt"]
        prompt_embeds, pooled_prompt_embeds = self.identity(prompt, photos, id_embeds)
        tokens_text_only = self.tokenizer.encode(prompt, add_special_tokens=False)
        tokens_text_only.remove(self.tokenizer.convert_tokens_to_ids(self.trigger_word))
        prompt_text_only = self.tokenizer.decode(tokens_text_only, add_special_tokens=False)
        prompt_embeds_text_only, negative_prompt_embeds, pooled_text_only, negative_pooled = pipe.encode_prompt(
            prompt=prompt_text_only, device="cpu", num_images_per_prompt=num,
            negative_prompt=settings["negative_prompt"])
        prompt_embeds = prompt_embeds.repeat(1, num, 1).view(num, prompt_embeds.shape[1], -1)
        pooled_prompt_embeds = pooled_prompt_embeds.repeat(1, num).view(num, -1)
        height, width = settings["height"], settings["width"]
        add_time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(2 * num, 1)
        scheduler = pipeline._make_scheduler(settings["scheduler"], self.session.scheduler_config)
        scheduler.set_timesteps(settings["steps"])
        generator = torch.Generator("cpu").manual_seed(settings["seed"])
        latents = torch.randn((num, 4, height // 8, width // 8), generator=generator) * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            if i <= start_merge_step:
                current = torch.cat([negative_prompt_embeds, prompt_embeds_text_only])
                add_text_embeds = torch.cat([negative_pooled, pooled_text_only])
            else:
                current = torch.cat([negative_prompt_embeds, prompt_embeds])
                add_text_embeds = torch.cat([negative_pooled, pooled_prompt_embeds])
            noise_pred = pipe.unet(latent_model_input, t, encoder_hidden_states=current,
                                   added_cond_kwargs={"text_embeds": add_text_embeds, "time_ids": add_time_ids},
                                   return_dict=False)[0]
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + settings["guidance_scale"] * (noise_pred_text - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return latents


def official_id_embeds(session, engine, photos):
    """app_v2.py's `faces[0]['embedding']` per photo, stacked: the recogniser's unnormalised embedding."""
    embeddings = []
    for photo in photos:
        face = session.faces.detect(photo)
        feature = engine.recogniser.get(np.ascontiguousarray(np.asarray(photo.convert("RGB"))[:, :, ::-1]), face)
        embeddings.append(torch.from_numpy(np.asarray(feature, dtype=np.float32)))
    return torch.stack(embeddings)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    weights = smoke.build_smoke_weights(tmp_path_factory.mktemp("photomaker") / "smoke")
    session = pipeline.load_pipeline(weights, memory.choose_plan(16, None), progress=False)
    engine = session.identity_engine("photomaker-v2")
    return session, engine, OfficialPhotoMaker(session, engine.files)


@contextlib.contextmanager
def official_unet(session, lora: bool = True):
    """The UNet as the official pipeline has it: its LoRA on, no IP-Adapter (plain attention, no projection)."""
    engine = session.identity_engine("photomaker-v2")
    activate(session.pipe, {photomaker.LORA_ADAPTER: 1.0} if lora else {})
    try:
        with engine.installed(session.pipe.unet):
            yield
    finally:
        activate(session.pipe, session.loras.active)


PHOTOS = [smoke.sample_face_image(256), smoke.sample_face_image(320, face_color=(200, 170, 150))]


@pytest.mark.parametrize("photos", [1, 2])
def test_the_identity_prompt_equals_the_official_id_encoder(setup, photos):
    session, engine, official = setup
    given = PHOTOS[:photos]
    prompt = "instagram photo, portrait photo of a woman img, colorful, perfect face"
    ours, ours_pooled = engine.identity_prompt(session.pipe, session.faces, given, prompt, torch.device("cpu"))
    with torch.no_grad():
        expected, pooled = official.identity(prompt, given, official_id_embeds(session, engine, given))
    assert ours.shape == expected.shape == (1, 77, session.pipe.unet.config.cross_attention_dim)
    print(f"identity prompt, {photos} photo(s): {relative_difference(ours, expected):.2e} relative")
    assert relative_difference(ours, expected) < TOKENS_TOLERANCE
    assert relative_difference(ours_pooled, pooled) < TOKENS_TOLERANCE
    assert relative_difference(ours, official.encode_prompt_with_trigger_word(prompt, photos)[0]) > 0.01  # fused


@pytest.mark.parametrize("case", [
    dict(steps=6, adapter_strength=0.8, seed=3),  # 20 %: start_merge_step 1, the identity from step 3 of 6
    dict(steps=5, adapter_strength=0.5, seed=4, num_images=2),  # 50 %: the identity from step 4 of 5
])
def test_photomaker_equals_the_official_pipeline(setup, monkeypatch, case):
    session, engine, official = setup
    photos = PHOTOS[:1 + case.get("num_images", 1) // 2]
    result, latents = generate_with_latents(
        session, monkeypatch, photos[0], "portrait photo of a man img, in a garden", identity="photomaker-v2",
        extra_face_images=photos[1:], width=128, height=128, guidance_scale=5.0, scheduler="Euler", **case)
    merge = result.settings["identity_settings"]["start_merge_step"]
    assert merge == int(round(100 * (1 - case["adapter_strength"]), 6) / 100 * case["steps"])
    with official_unet(session):
        expected = official.inference(result.settings, photos, official_id_embeds(session, engine, photos), merge)
    assert latents.shape == expected.shape
    print(f"latents, {case}: {relative_difference(latents, expected):.2e} relative")
    assert relative_difference(latents, expected) < LATENTS_TOLERANCE
    with official_unet(session):  # the identity merged from the start instead: the comparison sees the schedule
        wrong = official.inference(result.settings, photos, official_id_embeds(session, engine, photos), -1)
    assert relative_difference(latents, wrong) > 10 * LATENTS_TOLERANCE
    with official_unet(session, lora=False):  # and the file's LoRA
        wrong = official.inference(result.settings, photos, official_id_embeds(session, engine, photos), merge)
    assert relative_difference(latents, wrong) > 10 * LATENTS_TOLERANCE


def test_other_methods_are_unchanged_by_a_photomaker_picture(setup, monkeypatch):
    session, _, _ = setup
    photo = PHOTOS[0]
    kwargs = dict(width=64, height=64, steps=2, seed=9)
    before = {name: generate_with_latents(session, monkeypatch, photo, "a portrait", identity=name, **kwargs)[1]
              for name in ("instantid", "pulid")}
    generate_with_latents(session, monkeypatch, photo, "a man img", identity="photomaker-v2", **kwargs)
    for name, latents in before.items():
        assert torch.equal(latents, generate_with_latents(session, monkeypatch, photo, "a portrait", identity=name,
                                                          **kwargs)[1]), name


@pytest.mark.parametrize("kwargs, said", [
    (dict(prompt="a portrait of a man"), "needs its trigger word 'img' once in the prompt"),
    (dict(prompt="a man img with an img"), "the prompt has it 2 times"),
    (dict(pose_image="photo"), "identity photomaker-v2 has no keypoint layout"),
    (dict(init_image="photo"), "does not start from a photo"),
    (dict(negative_noise=0.3), "negative_noise must be 0"),
])
def test_what_photomaker_cannot_do_is_refused_in_one_sentence(setup, kwargs, said):
    session, _, _ = setup
    photo = PHOTOS[0]
    kwargs = {"prompt": "a man img", **{key: photo if value == "photo" else value for key, value in kwargs.items()}}
    with pytest.raises(SettingsError, match=said) as refused:
        pipeline.generate(session, photo, identity="photomaker-v2", **kwargs)
    assert len(refused.value.problems) == 1


def test_a_class_word_too_near_the_end_for_its_photos_is_refused(setup):
    session, engine, _ = setup
    tokenizer = engine.tokenizers[0]
    trigger = tokenizer.convert_tokens_to_ids("img")
    prompt = next(prompt for prompt in ("x " * words + "a man img" for words in range(75, 0, -1))
                  if trigger in tokenizer(prompt, max_length=77, truncation=True).input_ids)  # the latest place it fits
    assert len(photomaker.trigger_tokens(tokenizer, prompt, 1)[0]) == 77  # one photo: two copies still fit
    with pytest.raises(SettingsError, match="too near the end of the prompt for 2 photos"):
        photomaker.trigger_tokens(tokenizer, prompt, 2)


def test_photomaker_runs_with_a_speed_mode_a_style_lora_and_an_extra_controlnet(setup, monkeypatch):
    from instantid_colab.controls import Control
    from instantid_colab.loras import Lora

    session, _, _ = setup
    seen, using = [], pipeline._using_controlnet
    monkeypatch.setattr(pipeline, "_using_controlnet", lambda caller, net: seen.append(net) or using(caller, net))
    result = pipeline.generate(session, PHOTOS[0], "a man img on a beach", identity="photomaker-v2", speed="lightning-4",
                               width=128, height=128, loras=[Lora("smoke", 0.5)],
                               controls=[Control("canny", PHOTOS[0], 0.5, 0.0, 1.0, False)])
    (net,) = seen
    assert type(net).__name__ == "ControlNetModel"
    assert result.settings["speed"]["name"] == "lightning-4" and result.settings["steps"] == 4
    assert sorted(session.loras.active.values()) == [0.5, 1.0, 1.0]  # the style LoRA, the speed LoRA, PhotoMaker's
    assert photomaker.LORA_ADAPTER in session.loras.active


def test_a_file_that_does_not_fit_is_named_key_by_key(setup):
    session, engine, _ = setup
    groups = photomaker.read_groups(engine.files.adapter)
    groups["id_encoder"].pop("fuse_module.layer_norm.bias")
    groups["id_encoder"]["qformer_perceiver.token_norm.weight"] = torch.zeros(3)
    name = next(key for key in groups["lora_weights"] if key.endswith("to_q_lora.down.weight"))
    groups["lora_weights"][name] = torch.zeros(4, 5)
    with pytest.raises(AdapterError) as error:
        photomaker.check_fits(groups, engine.id_encoder, session.pipe, "bad.bin")
    said = str(error.value)
    assert "id_encoder.missing fuse_module.layer_norm.bias [64]" in said
    assert "id_encoder.qformer_perceiver.norm.weight: expected [64], file has [3]" in said
    assert "lora_weights: " in said and "for a layer of" in said
    assert "TencentARC/PhotoMaker-V2 photomaker-v2.bin" in said


def test_photomaker_metadata_the_command_line_and_a_manifest(setup, tmp_path, capsys):
    import json

    from PIL import Image

    from instantid_colab import batch, cli

    out = tmp_path / "pm.png"
    assert cli.main(["generate", "--smoke", "--identity", "photomaker-v2", "--prompt", "a woman img", "--steps", "5",
                     "--adapter-strength", "0.6", "--weights-dir", str(tmp_path / "weights"), "--out", str(out)]) == 0
    metadata = json.loads(Image.open(out).text["instantid"])
    assert metadata["identity_engine"] == "photomaker-v2" and metadata["combine"] is None
    assert metadata["identity_settings"]["start_merge_step"] == 2  # 40 % of 5 steps
    capsys.readouterr()
    assert cli.main(["generate", "--smoke", "--identity", "photomaker-v2", "--prompt", "a woman", "--weights-dir",
                     str(tmp_path / "not-made"), "--out", str(tmp_path / "no.png")]) == 2
    assert "trigger word 'img'" in capsys.readouterr().err and not (tmp_path / "not-made").exists()
    PHOTOS[0].save(tmp_path / "face.png")
    (tmp_path / "rows.csv").write_text("face,identity,prompt\nface.png,photomaker-v2,a portrait\n")
    with pytest.raises(batch.ManifestError, match="row 1.*trigger word 'img'"):
        batch.prepare_rows(tmp_path / "rows.csv", smoke=True)


def test_the_registry_line_says_what_photomaker_can_do():
    method = settings.engines.method("photomaker-v2")
    assert (method.several_people, method.keypoint_layout, method.start_photo, method.refine) == (False,) * 4
    assert method.unused() == ("identitynet_strength", "enhance_non_face", "s_scale", "combine")
    assert dataclasses.replace(method, prompt_word=None).cannot({"prompt": "x"}) == []
