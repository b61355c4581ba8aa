"""Style LoRAs through diffusers' adapter API: load, weigh, combine with LCM, remove, refuse (smoke weights, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from instantid_colab import loras, memory, pipeline, smoke
from instantid_colab.loras import Lora, LoraError
from instantid_colab.settings import SettingsError
from instantid_colab.smoke.diffusion import TINY
from instantid_colab.weights import MissingWeightsError

SIZE = dict(width=64, height=64, steps=2, seed=21)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return smoke.build_smoke_weights(tmp_path_factory.mktemp("smoke"))


@pytest.fixture
def session(weights):
    return pipeline.load_pipeline(weights, memory.choose_plan(16, None), progress=False)


@pytest.fixture(scope="module")
def face():
    return smoke.sample_face_image()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A second valid LoRA, one shaped for SD 1.5's 768-wide text, one for layers SDXL lacks, and junk."""
    folder = tmp_path_factory.mktemp("loras")
    other = smoke.write_tiny_lora(folder / "other", TINY, seed=9)
    state = load_file(str(other))
    sd15 = {key: (torch.zeros(value.shape[0], 768) if "attn2.to_k.lora_A" in key else value) for key, value in state.items()}
    save_file(sd15, str(folder / "sd15_style.safetensors"))
    elsewhere = {key.replace("down_blocks.1", "down_blocks.7"): value for key, value in state.items()}
    save_file(elsewhere, str(folder / "other_model.safetensors"))
    (folder / "junk.safetensors").write_bytes(np.random.default_rng(2).bytes(2048))
    return {"other": other, "sd15": folder / "sd15_style.safetensors", "elsewhere": folder / "other_model.safetensors",
            "junk": folder / "junk.safetensors"}


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], np.int16)


def base_weights(unet) -> dict[str, torch.Tensor]:
    """The UNet's own weights, whatever LoRA wrappers peft put around them."""
    return {name.replace(".base_layer", ""): parameter.detach().clone()
            for name, parameter in unet.named_parameters() if "lora_" not in name}


def test_loading_weighing_and_removing_leaves_the_base_weights_bit_identical(session, face):
    before_weights = base_weights(session.pipe.unet)
    plain = pipeline.generate(session, face, **SIZE)
    styled = pipeline.generate(session, face, loras=[Lora("smoke", 1.0)], **SIZE)
    lighter = pipeline.generate(session, face, loras=[Lora("smoke", 0.3)], **SIZE)
    assert np.abs(pixels(styled) - pixels(plain)).mean() > 1
    assert np.abs(pixels(lighter) - pixels(styled)).mean() > 0.5
    removed = pipeline.generate(session, face, **SIZE)
    assert np.array_equal(pixels(removed), pixels(plain))
    after_weights = base_weights(session.pipe.unet)
    assert after_weights.keys() == before_weights.keys()
    assert all(torch.equal(after_weights[name], before_weights[name]) for name in before_weights)
    assert styled.settings["loras"] == [{"name": "smoke", "scale": 1.0}]


def test_several_loras_with_lcm_and_scale_changes_reload_nothing(session, face, files, monkeypatch):
    loads = []
    original = session.pipe.load_lora_weights
    monkeypatch.setattr(session.pipe, "load_lora_weights",
                        lambda *a, **k: loads.append(k["adapter_name"]) or original(*a, **k))
    pipeline.generate(session, face, loras=[Lora("smoke", 0.7), Lora(str(files["other"]), 0.4)], lcm=True, **SIZE)
    other = loras.adapter_name(files["other"])
    (lcm,) = [name for name in session.loras.active if name.startswith(loras.SPEED_PREFIX)]
    assert sorted(session.loras.active.values()) == [0.4, 0.7, 1.0]
    assert session.loras.active[other] == 0.4 and session.loras.active[lcm] == 1.0
    pipeline.generate(session, face, loras=[Lora("smoke", 1.2), Lora(str(files["other"]), -0.5)], **SIZE)
    assert sorted(session.loras.active.values()) == [-0.5, 1.2] and lcm not in session.loras.active
    assert len(loads) == 3  # smoke, other, lcm: each loaded once
    pipeline.generate(session, face, loras=[Lora(str(files["other"]), 1.0)], **SIZE)
    assert set(session.pipe.get_list_adapters()["unet"]) == {other, lcm}  # smoke deleted, LCM kept for later
    pipeline.generate(session, face, speed="lightning-4", **SIZE)  # another preset's LoRA replaces it
    assert lcm not in session.pipe.get_list_adapters()["unet"] and len(loads) == 4


@pytest.mark.parametrize(("which", "message"), [
    ("sd15", r"(?s)does not fit this pipeline:\n  - unet\.down_blocks\.1\..*attn2\.to_k\.lora_A\.weight: LoRA \[4, 768\]"
             r".*Likely cause: it looks like a Stable Diffusion 1\.5 LoRA"),
    ("elsewhere", r"unet\.down_blocks\.7\..*: this pipeline has no unet\.down_blocks\.7\."),
    ("junk", r"cannot be read as an SDXL LoRA"),
])
def test_a_lora_that_does_not_fit_is_refused_and_changes_nothing(session, face, files, which, message):
    styled = pipeline.generate(session, face, loras=[Lora("smoke", 0.8)], **SIZE)
    adapters = session.pipe.get_list_adapters()
    with pytest.raises(LoraError, match=message):
        pipeline.generate(session, face, loras=[Lora("smoke", 0.8), Lora(str(files[which]), 1.0)], **SIZE)
    assert session.pipe.get_list_adapters() == adapters
    again = pipeline.generate(session, face, loras=[Lora("smoke", 0.8)], **SIZE)
    assert np.array_equal(pixels(again), pixels(styled))


def test_lora_names_and_scales_are_checked(weights, tmp_path):
    assert loras.parse_lora("owner/style:0.6") == Lora("owner/style", "0.6")
    assert loras.parse_lora("smoke") == Lora("smoke")
    with pytest.raises(SettingsError, match="LoRA a scale 5.0 is out of range: use -2 to 2"):
        loras.check_loras([Lora("a", 5.0)])
    with pytest.raises(SettingsError, match="LoRA a is given twice"):
        loras.check_loras([Lora("a"), Lora("a")])
    from instantid_colab.weights import ensure_lora

    with pytest.raises(MissingWeightsError, match="missing.safetensors: no such file"):
        ensure_lora(weights, str(tmp_path / "missing.safetensors"))
    with pytest.raises(MissingWeightsError, match="LoRA owner/style: expected one .safetensors file"):
        ensure_lora(weights, "owner/style", offline=True)


def test_a_lora_without_text_encoder_keys_loads_without_diffusers_open_an_issue_warning(session, face, diffusers_said):
    """A speed preset's LoRA holds UNet keys only: diffusers warns about each text encoder on every load."""
    fast = pipeline.generate(session, face, speed="lightning-4", **SIZE)
    assert fast.settings["speed"]["name"] == "lightning-4"
    assert not [message for message in diffusers_said if "No LoRA keys associated" in message]
