"""The identity methods as equals: the registry decides what each can do, and a call reaches a method only through
its engine's interface (no per-method branch), so a new method is a module and one registry line."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch

from instantid_colab import engines, pipeline, settings, smoke
from instantid_colab.engines.common import Conditioning, ControlSlot
from instantid_colab.settings import SettingsError


@pytest.fixture(scope="module")
def session(smoke_session):
    return smoke_session


class RecordingEngine:
    """A fourth method that only records what the call gives it and says what the call should use."""

    lora_adapters = None
    photo_side = 256

    def __init__(self, pipe):
        self.calls, self.entered = [], 0
        self.identitynet = pipe.controlnet

    def conditioning(self, call):
        self.calls.append(call)
        text = {name: tensor * 0 for name, tensor in call.text.items()}  # an engine may replace the prompt's embeddings
        steps = []

        def after_step(step, tensors):
            steps.append(sorted(tensors))
            return tensors

        self.steps = steps
        return Conditioning({}, self._installed(call.pipe.unet), [], text=text, after_step=after_step,
                            tensor_inputs=("prompt_embeds",))

    @contextlib.contextmanager
    def _installed(self, unet):  # no tokens of its own: InstantID's projection off for the call, as PuLID's
        self.entered += 1
        projection, unet.encoder_hid_proj = unet.encoder_hid_proj, None
        try:
            yield
        finally:
            unet.encoder_hid_proj = projection

    def describe(self, values):
        return {"recorded": True}

    def where(self):
        return "recording: nothing"

    def to(self, device):
        pass

    def release(self, pipe):
        self.released = True


@pytest.fixture
def fourth_method(monkeypatch, session):
    module = types.ModuleType("recording_engine")
    module.ensure_files = lambda weights: None
    module.load = lambda pipe, files, device: RecordingEngine(pipe)
    monkeypatch.setitem(sys.modules, "recording_engine", module)
    monkeypatch.setitem(engines.METHODS, "recording", engines.Method("recording", "recording_engine", "Recording", 0,
                                                                     ("combine",), concat=False, layers_gib=0.1))
    yield
    session.engines.pop("recording", None)


def test_what_a_method_can_do_is_its_registry_lines_not_its_name(monkeypatch):
    values = {"identity": "faceid-plusv2", "several_people": True, "combine": "concat", "negative_noise": 0.2}
    with pytest.raises(SettingsError) as refused:
        settings.check(values)
    assert [problem.split(":")[0] for problem in refused.value.problems] == [
        "identity faceid-plusv2 makes one person", "identity faceid-plusv2 takes one face embedding"]
    monkeypatch.setitem(engines.METHODS, "faceid-plusv2",
                        engines.Method("faceid-plusv2", "x", "x", 0, ("combine",), several_people=True))
    assert settings.check(values)["combine"] == "concat"
    assert settings.unused({"identity": "pulid", "combine": "average", "s_scale": 1.0}) == {
        "combine": "identity pulid does not use it", "s_scale": "identity pulid does not use it"}


def test_every_method_refuses_what_its_line_says_in_one_sentence_each():
    for name, method in engines.METHODS.items():
        problems = method.cannot({"several_people": True, "pose_image": "p.png", "init_image": "i.png",
                                  "refine_face": 0.4, "negative_noise": 0.3, "combine": "concat"})
        expected = sum([not method.several_people, not method.keypoint_layout, not method.start_photo,
                        not method.refine, not method.negative_noise, not method.concat and "combine" in method.reads])
        assert len(problems) == expected and all(problem.count(". ") == 0 for problem in problems), name


def test_a_fourth_method_is_reached_through_its_engine_alone(session, fourth_method):
    assert "recording" in settings.check({"identity": "recording"})["identity"]
    result = pipeline.generate(session, smoke.sample_face_image(512), "a portrait", identity="recording", width=64,
                               height=64, steps=3, seed=5)
    engine = session.engines["recording"]
    (call,) = engine.calls
    assert [photo.size for photo in call.photos] == [(256, 256)]  # opened at the engine's photo side
    assert call.values["combine"] == "average" and call.num == 1 and not call.several_people
    assert engine.entered == 1 and engine.steps == [["latents", "prompt_embeds"]] * 3
    assert result.settings["identity_settings"] == {"recorded": True}
    assert result.settings["identitynet_strength"] is None and result.settings["enhance_non_face"] is None
    assert session.pipe.controlnet is engine.identitynet  # no ControlNet slots: the text2img view ran, nothing swapped
    blank = pipeline.generate(session, smoke.sample_face_image(512), "another prompt", identity="recording", width=64,
                              height=64, steps=3, seed=5)  # the engine zeroed the text: the prompt cannot matter
    assert list(blank.images[0].getdata()) == list(result.images[0].getdata())


def test_an_engines_controlnet_slots_are_run_as_the_call_s_controlnets(session, fourth_method, monkeypatch):
    seen = []
    original = RecordingEngine.conditioning
    net = session.pipe.controlnet

    def with_a_slot(self, call):
        answer = original(self, call)
        tokens = torch.zeros(2, 16, session.pipe.unet.config.cross_attention_dim)
        answer.controlnets = [ControlSlot(net, call.cast.kps_images()[0], 0.7, 0.0, 0.5)]
        answer.context = contextlib.ExitStack()
        answer.context.enter_context(self._installed(call.pipe.unet))
        answer.context.enter_context(net.conditioned(tokens))
        return answer

    forward = type(net).forward

    def spy(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0, *args, **kwargs):
        seen.append(conditioning_scale)
        return forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, *args,
                       **kwargs)

    monkeypatch.setattr(RecordingEngine, "conditioning", with_a_slot)
    monkeypatch.setattr(type(net), "forward", spy)
    pipeline.generate(session, smoke.sample_face_image(512), "a portrait", identity="recording", width=64, height=64,
                      steps=4, seed=5)
    assert seen == [0.7, 0.7, 0.0, 0.0]  # the slot's strength over its first half of the steps, then off


def test_switching_methods_releases_the_others_when_host_ram_would_not_hold_both(session, monkeypatch):
    import psutil

    face = smoke.sample_face_image(256)
    pipeline.generate(session, face, "a portrait", identity="faceid-plusv2", width=64, height=64, steps=2)
    assert "faceid_0" in session.pipe.unet.peft_config
    roomy = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: roomy._replace(available=2 * 2**30))  # 2 GiB left
    pipeline.generate(session, face, "a portrait", identity="pulid", width=64, height=64, steps=2)
    assert set(session.engines) == {"instantid", "pulid"}
    assert "faceid_0" not in getattr(session.pipe.unet, "peft_config", {})  # its LoRA is off the UNet
    again = pipeline.generate(session, face, "a portrait", identity="faceid-plusv2", width=64, height=64, steps=2)
    assert set(session.engines) == {"instantid", "faceid-plusv2"} and again.settings["identity_engine"] == "faceid-plusv2"
    monkeypatch.setattr(psutil, "virtual_memory", lambda: roomy)
    pipeline.generate(session, face, "a portrait", identity="pulid", width=64, height=64, steps=2)
    assert set(session.engines) == {"instantid", "faceid-plusv2", "pulid"}  # room for both: both kept


def test_a_method_with_a_trigger_word_refuses_a_prompt_without_it_exactly_once():
    method = engines.Method("triggered", "x", "x", 0, (), prompt_word="img")
    assert method.cannot({"prompt": "a photo of a man img, smiling"}) == []
    for prompt, times in (("a photo of a man", 0), ("a man img in an imgur office", 2)):
        (problem,) = method.cannot({"prompt": prompt})
        assert problem.startswith("identity triggered needs its trigger word 'img' once") and f"{times} times" in problem


def test_a_benchmark_prompt_is_given_a_methods_trigger_word_and_scored_without_it():
    method = engines.Method("triggered", "x", "x", 0, (), prompt_word="img")
    assert method.prompt_for("photo of a person in a red jacket") == "photo of a person img in a red jacket"
    assert method.prompt_for("portrait, color, cinematic") == "a person img, portrait, color, cinematic"
    assert method.prompt_for("a man img, smiling") == "a man img, smiling"
    assert engines.method("instantid").prompt_for("portrait, color") == "portrait, color"
