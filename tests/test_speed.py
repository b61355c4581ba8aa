"""Speed modes (smoke: random weights, CPU): presets with their sampler and LoRA, the guidance interval (the full
interval is today's latents bit for bit; a partial one runs the unconditional half on exactly its steps), previews
that never change the final image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instantid_colab import cli, pipeline, smoke, speed
from instantid_colab.engines.instantid import IdentityNet
from instantid_colab.settings import SettingsError
from tests.latents import generate_with_latents

SIZE = dict(width=64, height=64)


@pytest.fixture(scope="module")
def face():
    return smoke.sample_face_image()


def test_every_preset_runs_with_its_card_settings_and_records_them(smoke_session, face):
    for name, preset in speed.SPEEDS.items():
        result = pipeline.generate(smoke_session, face, seed=1, speed=name, **SIZE)
        settings = result.settings
        assert (settings["steps"], settings["guidance_scale"], settings["scheduler"]) == (
            preset.steps, preset.guidance_scale, preset.scheduler), name
        assert settings["speed"]["name"] == name and settings["speed"]["lora"] == (
            "/".join(preset.lora) if preset.lora else None)
        scheduler = type(smoke_session.pipe.scheduler).__name__
        expected = {"Euler": "EulerDiscreteScheduler", "LCM": "LCMScheduler", "Euler trailing": "EulerDiscreteScheduler",
                    "DDIM trailing": "DDIMScheduler", "TCD": "TCDScheduler"}[preset.scheduler]
        assert scheduler == expected, name
        if preset.scheduler.endswith("trailing"):
            assert smoke_session.pipe.scheduler.config.timestep_spacing == "trailing"


def test_dmd2_samples_at_its_training_timesteps(smoke_session, face):
    pipeline.generate(smoke_session, face, seed=1, speed="dmd2-4", **SIZE)
    assert [int(t) for t in smoke_session.pipe.scheduler.timesteps] == [999, 749, 499, 249]


def test_the_users_steps_and_guidance_win_over_the_preset(smoke_session, face):
    result = pipeline.generate(smoke_session, face, seed=1, speed="lightning-8", steps=6, guidance_scale=2.0, **SIZE)
    assert (result.settings["steps"], result.settings["guidance_scale"]) == (6, 2.0)
    assert result.settings["scheduler"] == "Euler trailing"


def test_the_full_interval_is_todays_latents_bit_for_bit(smoke_session, face, monkeypatch):
    _, plain = generate_with_latents(smoke_session, monkeypatch, face, seed=4, steps=5, **SIZE)
    _, full = generate_with_latents(smoke_session, monkeypatch, face, seed=4, steps=5, guidance_interval=(0, 1), **SIZE)
    assert torch.equal(plain, full)


def test_a_partial_interval_computes_the_unconditional_half_on_exactly_its_steps(smoke_session, face, monkeypatch):
    batches = {"unet": [], "identitynet": []}
    for name, cls in (("unet", type(smoke_session.pipe.unet)), ("identitynet", IdentityNet)):
        def recording(self, sample, *args, _name=name, _forward=cls.forward, **kwargs):
            batches[_name].append(sample.shape[0])  # inside the half-batch wrapper: what is really computed
            return _forward(self, sample, *args, **kwargs)
        monkeypatch.setattr(cls, "forward", recording)
    result, interval_latents = generate_with_latents(smoke_session, monkeypatch, face, seed=4, steps=10,
                                                     guidance_interval="0.2,0.7", **SIZE)
    monkeypatch.undo()
    assert batches["unet"] == [1, 1, 2, 2, 2, 2, 2, 1, 1, 1]  # steps 2-6: int(0.2 x 10) <= step < int(0.7 x 10)
    assert batches["identitynet"] == batches["unet"]
    assert result.settings["guidance_interval"] == [0.2, 0.7] and result.settings["unconditional_steps"] == 5
    _, plain = generate_with_latents(smoke_session, monkeypatch, face, seed=4, steps=10, **SIZE)
    assert not torch.equal(plain, interval_latents)


def test_an_interval_step_without_guidance_equals_guidance_one(smoke_session, face, monkeypatch):
    """Outside the interval the step is the conditional prediction: what guidance 1 (no CFG) computes."""
    _, outside = generate_with_latents(smoke_session, monkeypatch, face, seed=4, steps=3, guidance_interval="0,0.01",
                                       **SIZE)
    _, unguided = generate_with_latents(smoke_session, monkeypatch, face, seed=4, steps=3, guidance_scale=1.0, **SIZE)
    torch.testing.assert_close(outside, unguided, rtol=1e-5, atol=1e-5)


def test_previews_come_every_k_steps_and_never_change_the_image(smoke_session, face, monkeypatch):
    shown = []
    _, plain = generate_with_latents(smoke_session, monkeypatch, face, seed=2, steps=6, **SIZE)
    _, previewed = generate_with_latents(smoke_session, monkeypatch, face, seed=2, steps=6, preview_every=2,
                                         preview=lambda step, total, image: shown.append((step, total, image.size)),
                                         **SIZE)
    assert torch.equal(plain, previewed)
    assert [(step, total) for step, total, _ in shown] == [(2, 6), (4, 6), (6, 6)]
    assert all(size == (64, 64) for _, _, size in shown)  # TAESD decodes to the picture's size


@pytest.mark.parametrize(("call", "message"), [
    (lambda: speed.preset("turbo"), r"speed 'turbo' is not one of: quality, lcm, lightning-4"),
    (lambda: speed.parse_interval("0.8,0.2"), r"START must be before END"),
    (lambda: speed.parse_interval("0.2"), r"is not START,END"),
    (lambda: speed.parse_interval("0,1.5"), r"guidance_end 1.5 is out of range: use 0 to 1"),
])
def test_wrong_speed_settings_are_refused(call, message):
    with pytest.raises(SettingsError, match=message):
        call()


def test_cli_speed_and_interval_in_smoke_mode(tmp_path, capsys):
    """The issue's commands: `generate --smoke --speed lightning-4` and `--guidance-interval 0.2,0.8`."""
    import json

    from PIL import Image

    assert cli.main(["generate", "--smoke", "--speed", "lightning-4", "--out", str(tmp_path / "x.png")]) == 0
    metadata = json.loads(Image.open(tmp_path / "x.png").text["instantid"])
    assert metadata["speed"]["name"] == "lightning-4" and metadata["scheduler"] == "Euler trailing"
    assert metadata["steps"] == 4 and metadata["guidance_scale"] == 0.0
    assert cli.main(["generate", "--smoke", "--steps", "5", "--guidance-interval", "0.2,0.8",
                     "--out", str(tmp_path / "y.png")]) == 0
    metadata = json.loads(Image.open(tmp_path / "y.png").text["instantid"])
    assert metadata["guidance_interval"] == [0.2, 0.8] and metadata["unconditional_steps"] == 3
    assert np.asarray(Image.open(tmp_path / "y.png")).shape == (128, 128, 3)


def test_switching_speed_modes_says_nothing_that_looks_like_a_failure(smoke_session, face, diffusers_said, recwarn):
    """peft's "Already found a `peft_config`" on every LoRA beside another, and DMD2's card schedule "not on the
    original training/distillation timestep schedule" twice per picture: both expected, both answered, both gone."""
    for name in ("lightning-4", "dmd2-4", "lightning-4", "dmd2-4"):
        pipeline.generate(smoke_session, face, seed=1, speed=name, **SIZE)
    assert not [w for w in recwarn.list if "Already found a `peft_config`" in str(w.message)]
    assert not [message for message in diffusers_said if message.startswith("The custom timestep schedule contains")]
