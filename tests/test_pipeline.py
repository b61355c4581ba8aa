"""InstantID pipeline on tiny random weights (smoke: random weights), CPU, a few steps."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from PIL import Image

from instantid_colab import loras, memory, pipeline, settings, smoke
from instantid_colab.faces import NoFaceError
from instantid_colab.engines.instantid import FaceRegion
from instantid_colab.png_metadata import save_png

SIZE = dict(width=128, height=64, steps=2)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return smoke.build_smoke_weights(tmp_path_factory.mktemp("smoke"))


@pytest.fixture(scope="module")
def session(weights):
    return pipeline.load_pipeline(weights, memory.choose_plan(16, None), progress=False)


@pytest.fixture(scope="module")
def face():
    return smoke.sample_face_image()


def _pixels(result):
    return np.asarray(result.images[0], dtype=np.int16)


def test_size_label_and_seed_reproducibility(session, face):
    first = pipeline.generate(session, face, "a man", seed=1, **SIZE)
    again = pipeline.generate(session, face, "a man", seed=1, **SIZE)
    other = pipeline.generate(session, face, "a man", seed=2, **SIZE)
    assert first.images[0].size == (128, 64)
    assert first.label == smoke.SMOKE_LABEL and first.seed == 1
    assert np.array_equal(_pixels(first), _pixels(again))
    assert np.abs(_pixels(first) - _pixels(other)).mean() > 1.0
    assert first.kps_image.size == (128, 64)



def test_several_images_per_call_are_distinct_and_share_the_face_tokens(session, face, monkeypatch):
    seen = []
    original_cn = ControlNetModel.forward

    def controlnet_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        seen.append((sample.shape[0], encoder_hidden_states.shape[0]))
        return original_cn(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(ControlNetModel, "forward", controlnet_forward)
    result = pipeline.generate(session, face, "a man", seed=5, num_images=3, **SIZE)
    assert [image.size for image in result.images] == [(128, 64)] * 3
    assert seen[0] == (6, 6)  # 3 images x (negative, positive), one face-token set per latent
    pixels = [np.asarray(image, dtype=np.int16) for image in result.images]
    assert np.abs(pixels[0] - pixels[1]).mean() > 1.0 and np.abs(pixels[1] - pixels[2]).mean() > 1.0

def test_identitynet_gets_only_the_face_tokens_and_unet_gets_text_plus_ip(session, face, monkeypatch):
    seen = {}
    original_cn, original_unet = ControlNetModel.forward, type(session.pipe.unet).forward

    def controlnet_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        seen.setdefault("identitynet", encoder_hidden_states.detach().clone())
        return original_cn(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    def unet_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        seen.setdefault("unet", (encoder_hidden_states.shape, kwargs["added_cond_kwargs"]["image_embeds"]))
        return original_unet(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(ControlNetModel, "forward", controlnet_forward)
    monkeypatch.setattr(type(session.pipe.unet), "forward", unet_forward)
    result = pipeline.generate(session, face, "a man", adapter_strength=0.6, seed=3, **SIZE)

    cross_dim = session.pipe.unet.config.cross_attention_dim
    tokens = seen["identitynet"]
    assert tokens.shape == (2, 16, cross_dim)  # [negative, positive] x 16 face tokens, no text
    embedding, _ = session.faces.embed([face])
    resampler = session.pipe.unet.encoder_hid_proj.image_projection_layers[0]
    with torch.no_grad():
        positive = resampler(torch.as_tensor(embedding).reshape(1, 1, 512))
        negative = resampler(torch.zeros(1, 1, 512))
    torch.testing.assert_close(tokens[1], positive[0])
    torch.testing.assert_close(tokens[0], negative[0])

    text_shape, image_embeds = seen["unet"]
    assert tuple(text_shape) == (2, 77, cross_dim)  # the UNet's context is the text; face tokens go via IP attention
    assert image_embeds[0].shape == (2, 1, 1, 512)
    cross = [p for name, p in session.pipe.unet.attn_processors.items() if name.endswith("attn2.processor")]
    assert cross and all(isinstance(p, IPAdapterAttnProcessor2_0) for p in cross)
    assert all(p.scale == [0.6] for p in cross)
    assert result.settings["adapter_strength"] == 0.6


def test_negative_noise_changes_the_negative_tokens_only(session, face, monkeypatch):
    seen = []
    original = ControlNetModel.forward

    def controlnet_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        seen.append(encoder_hidden_states.detach().clone())
        return original(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(ControlNetModel, "forward", controlnet_forward)
    pipeline.generate(session, face, seed=4, negative_noise=0.0, **SIZE)
    pipeline.generate(session, face, seed=4, negative_noise=0.35, **SIZE)
    plain, noisy = seen[0], seen[-1]
    torch.testing.assert_close(plain[1], noisy[1])
    assert (plain[0] - noisy[0]).abs().max() > 1e-3


def test_face_mask_zeroes_identitynet_residuals_outside_the_face(session):
    net = session.pipe.controlnet
    mask = torch.zeros(64, 128)
    mask[16:48, 32:96] = 1
    sample = torch.randn(2, 4, 8, 16)
    tokens = torch.randn(2, 16, net.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    cond = torch.rand(2, 3, 64, 128)
    with net.conditioned(tokens, FaceRegion(mask)), torch.no_grad():
        down, mid = net(sample, 10, None, cond, added_cond_kwargs=added, return_dict=False)
    assert down[0][..., :2, :].abs().max() == 0 and down[0][..., 2:6, 4:12].abs().max() > 0
    assert mid.shape[-2:] == (4, 8)
    assert mid[..., 0, :].abs().max() == 0 and mid[..., :, :2].abs().max() == 0
    assert mid[..., 1:3, 2:6].abs().min() > 0


def test_nan_decode_is_redone(session, face):
    calls = []

    def nan_once(module, inputs, output):
        calls.append(1)
        return torch.full_like(output, float("nan")) if len(calls) == 1 else output

    handle = session.pipe.vae.decoder.register_forward_hook(nan_once)
    try:
        result = pipeline.generate(session, face, seed=5, **SIZE)
    finally:
        handle.remove()
    assert len(calls) >= 2
    assert any("NaN" in notice and "float32" in notice for notice in result.notices)
    pixels = _pixels(result)
    assert pixels.std() > 0 and not getattr(session.pipe.vae, "use_tiling", False)


def test_out_of_memory_steps_the_plan_down_and_retries_once(session, face, monkeypatch):
    lighter = dataclasses.replace(session.plan, why="lighter plan for the test", vae_tiling=True)
    applied = []
    monkeypatch.setattr(memory, "step_down", lambda plan: lighter)
    monkeypatch.setattr(memory, "apply", lambda plan, pipe: applied.append(plan))
    raised = []

    def oom_once(module, args):
        if not raised:
            raised.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    original_plan = session.plan
    handle = session.pipe.unet.register_forward_pre_hook(oom_once)
    try:
        result = pipeline.generate(session, face, seed=6, **SIZE)
    finally:
        handle.remove()
        session.plan = original_plan
    assert raised == [1] and applied == [lighter]
    assert result.plan == lighter and result.images[0].size == (128, 64)
    assert any("Ran out of GPU memory" in notice and "lighter plan for the test" in notice for notice in result.notices)


def test_official_output_size_rule():
    assert pipeline.official_size(3000, 2000) == (1280, 832)
    assert pipeline.official_size(1000, 1000) == (1280, 1280)
    assert pipeline.official_size(768, 1024) == (960, 1280)
    assert pipeline.official_size(640, 480) == (1280, 960)
    settings.check_size(1152, 896)
    with pytest.raises(settings.SettingsError, match="multiples of 64"):
        settings.check_size(1000, 1000)
    with pytest.raises(settings.SettingsError, match="width 1344 is out of range: use 64 to 1280"):
        settings.check_size(1344, 768)


def test_png_metadata_round_trip(session, face, tmp_path):
    result = pipeline.generate(session, face, "a pilot", style="Watercolor", seed=7, **SIZE)
    path = save_png(result.images[0], tmp_path / "out.png")
    text = Image.open(path).text
    settings = json.loads(text["instantid"])
    assert settings["seed"] == 7 and settings["steps"] == 2 and settings["style"] == "Watercolor"
    assert settings["prompt"].startswith("watercolor painting, a pilot.")
    assert text["label"] == smoke.SMOKE_LABEL and "seed: 7" in text["parameters"]


def test_empty_prompt_is_a_person_and_no_face_is_an_error(session, face):
    assert pipeline.generate(session, face, "  ", seed=8, **SIZE).settings["user_prompt"] == "a person"
    with pytest.raises(NoFaceError):
        pipeline.generate(session, Image.new("RGB", (128, 128)), "x", **SIZE)


def test_pose_image_supplies_the_keypoints(session, face):
    pose = Image.new("RGB", (256, 256), (24, 22, 30))
    pose.paste(face.crop((64, 64, 192, 192)), (0, 128))  # the face moved to the bottom-left
    result = pipeline.generate(session, face, seed=9, pose_image=pose, width=128, height=128, steps=2)
    kps = np.asarray(result.kps_image).sum(axis=2)
    assert kps[64:, :64].sum() > 0 and kps[:48, 64:].sum() == 0


def test_lcm_toggle_switches_scheduler_and_loads_the_lora_once(weights, face, monkeypatch):
    session = pipeline.load_pipeline(weights, memory.choose_plan(16, None), progress=False)
    loads = []
    original = session.pipe.load_lora_weights
    monkeypatch.setattr(session.pipe, "load_lora_weights", lambda *a, **k: loads.append(k["adapter_name"]) or original(*a, **k))
    before = pipeline.generate(session, face, seed=10, **SIZE)
    pipeline.generate(session, face, seed=10, lcm=True, guidance_scale=1.5, **SIZE)
    assert type(session.pipe.scheduler).__name__ == "LCMScheduler"
    pipeline.generate(session, face, seed=10, lcm=True, guidance_scale=1.5, **SIZE)
    assert len(loads) == 1 and loads[0].startswith(loras.SPEED_PREFIX + "pytorch_lora_weights")
    assert loads[0] in session.pipe.get_list_adapters()["unet"]
    after = pipeline.generate(session, face, seed=10, **SIZE)
    assert type(session.pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert np.array_equal(_pixels(before), _pixels(after))  # LoRA really switched off again


def test_float32_cpu_text_encoders_feed_a_lower_precision_unet(weights, face):
    """The step-down layout: text encoders stay float32 on the CPU while the denoiser runs in half precision."""
    session = pipeline.load_pipeline(weights, memory.choose_plan(16, None), progress=False)
    for model in (session.pipe.unet, session.pipe.controlnet, session.pipe.vae):
        model.to(torch.bfloat16)  # bfloat16: the CPU stand-in for the GPU's float16
    result = pipeline.generate(session, face, "a man", seed=11, **SIZE)
    assert result.images[0].size == (128, 64)
    assert session.pipe.text_encoder_2.dtype == torch.float32
    assert session.pipe.config.text_encoder_2 == ("transformers", "CLIPTextModelWithProjection")


def test_likeness_scores_every_image_ranks_them_and_lands_in_the_png(session, face, monkeypatch, tmp_path):
    """Each output image is compared with the identity used; here the decoded images are replaced by
    the same person, another person and a faceless picture, so the scores are known."""
    other = smoke.sample_face_image(face_color=(150, 210, 240))
    faceless = Image.new("RGB", (256, 256), (90, 90, 90))
    monkeypatch.setattr(session.pipe.image_processor, "postprocess",
                        lambda decoded, output_type: [faceless.copy(), other.copy(), face.copy()])
    result = pipeline.generate(session, face, seed=12, num_images=3, **SIZE)
    same, stranger, none = result.likeness[2], result.likeness[1], result.likeness[0]
    assert same.similarity == pytest.approx(1.0, abs=1e-4) and same.note is None
    assert stranger.similarity < 0.9
    assert none.similarity is None and none.note == "no face found in the generated image"
    assert result.best_first() == [2, 1, 0]
    for index in range(3):
        stored = json.loads(Image.open(save_png(result.images[index], tmp_path / f"{index}.png")).text["instantid"])
        assert stored["image_index"] == index
        assert stored["identity_similarity"] == result.likeness[index].similarity
        assert stored["identity_similarity_note"] == result.likeness[index].note
        assert stored["seed"] == 12


def test_likeness_of_several_reference_photos_uses_their_mean_direction(session, face):
    other = smoke.sample_face_image(face_color=(150, 210, 240))
    mine, theirs = (session.faces.detect(image).embedding for image in (face, other))
    both = np.stack([mine, theirs])
    expected = (mine / np.linalg.norm(mine) + theirs / np.linalg.norm(theirs))
    expected = float(np.dot(expected / np.linalg.norm(expected), mine / np.linalg.norm(mine)))
    assert session.faces.likeness(both, face).similarity == pytest.approx(expected, abs=1e-4)


def _stop_at_first_step():
    raise KeyboardInterrupt  # what Ctrl-C, or a notebook's Interrupt, raises between two steps


@pytest.mark.parametrize("how", ["Stop button", "Ctrl-C"])
def test_a_stopped_generation_leaves_the_session_ready_for_the_next(session, face, how):
    reference = pipeline.generate(session, face, seed=13, **SIZE)
    if how == "Stop button":
        with pytest.raises(pipeline.GenerationStopped, match="stopped after step 1 of 2"):
            pipeline.generate(session, face, seed=13, should_stop=lambda: True, **SIZE)
    else:
        with pytest.raises(KeyboardInterrupt):
            pipeline.generate(session, face, seed=13, callback=lambda step, total: _stop_at_first_step(), **SIZE)
    regions = [getattr(p, "region", None) for p in session.pipe.unet.attn_processors.values()]
    assert session.pipe.controlnet._face_tokens is None and regions.count(None) == len(regions)
    assert session.pipe.text_encoder is not None and session.pipe.text_encoder_2 is not None
    again = pipeline.generate(session, face, seed=13, **SIZE)
    assert np.array_equal(_pixels(reference), _pixels(again))


def test_settings_are_checked_before_any_face_analysis(session, monkeypatch):
    monkeypatch.setattr(session.faces, "embed", lambda *a, **k: pytest.fail("face analysis ran"))
    with pytest.raises(settings.SettingsError, match="steps 0 is out of range"):
        pipeline.generate(session, "no-such-photo.jpg", steps=0)


def test_face_tokens_and_key_values_are_computed_once_per_call_not_per_step(session, face):
    """Text and face tokens do not change between steps: the Resampler runs once, each IP layer's
    face and text keys/values once, whatever the number of steps (the equivalence test checks the numbers)."""
    processors = [p for p in session.pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip")]
    counts = {"resampler": 0, "ip": 0, "text": 0}
    hooks = [session.pipe.unet.encoder_hid_proj.register_forward_hook(lambda *a: counts.__setitem__("resampler", counts["resampler"] + 1))]
    hooks += [p.to_k_ip[0].register_forward_hook(lambda *a: counts.__setitem__("ip", counts["ip"] + 1)) for p in processors]
    attentions = [m for name, m in session.pipe.unet.named_modules() if name.endswith("attn2")]
    hooks += [m.to_k.register_forward_hook(lambda *a: counts.__setitem__("text", counts["text"] + 1)) for m in attentions]
    try:
        pipeline.generate(session, face, seed=14, width=64, height=64, steps=4)
    finally:
        for hook in hooks:
            hook.remove()
    assert counts == {"resampler": 1, "ip": len(processors), "text": len(attentions)}
    assert all(p.cache is None and p.region is None for p in processors)
    assert type(session.pipe.unet.encoder_hid_proj).__name__ == "MultiIPAdapterImageProjection"
