"""The memory plan's decision table, row by row, and the measuring and applying helpers."""

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from instantid_colab import memory
from instantid_colab.memory import choose_plan, step_down

FREE_COLAB = (11.0, 14.7)


# (ram, vram) -> placement, text encoders, face analysis, tiling, estimated VRAM, estimated RAM
@pytest.mark.parametrize("ram, vram, placement, te, face, tiling, est_vram, est_ram", [
    (11.0, 16.5, "gpu", "cuda", "cuda", False, 14.66, 4.1),  # room even for an untiled fp32 decode
    (11.0, 14.7, "gpu", "cuda", "cuda", True, 11.66, 4.1),  # free Colab T4
    (11.0, 12.0, "gpu", "cuda", "cpu", True, 11.06, 4.5),  # face analysis makes room
    (11.0, 10.5, "gpu", "cpu", "cpu", True, 9.56, 7.5),  # text encoders too
    (24.0, 10.0, "model_offload", "cuda", "cpu", True, 9.4, 12.46),  # UNet+IdentityNet co-resident, RAM holds all
    (11.0, 10.0, "group_offload", "cuda", "cuda", True, 6.17, 10.24),  # RAM too small for model offload
    (11.0, 7.5, "group_offload", "cuda", "cuda", True, 6.17, 10.24),  # 8 GB GPU on a Colab-sized RAM
    (24.0, 5.0, "group_offload", "cpu", "cpu", True, 4.07, 13.64),
    (24.0, 3.0, "sequential_offload", "cuda", "cpu", True, 1.71, 12.46),
])
def test_decision_table(ram, vram, placement, te, face, tiling, est_vram, est_ram):
    plan = choose_plan(ram, vram, 1024, 1024)
    assert (plan.placement, plan.text_encoder_device, plan.face_device, plan.vae_tiling) == (placement, te, face, tiling)
    assert (plan.estimated_vram_gib, plan.estimated_ram_gib) == (est_vram, est_ram)
    assert plan.estimated_vram_gib <= vram - memory.VRAM_MARGIN and plan.estimated_ram_gib <= ram - memory.RAM_MARGIN
    assert (plan.dtype, plan.device, plan.attention, plan.vae_slicing) == ("float16", "cuda", "sdpa", False)
    assert plan.why.endswith(".") and plan.why.count(". ") == 0


def test_free_colab_keeps_every_weight_on_the_gpu():
    plan = choose_plan(*FREE_COLAB, 1024, 1024)
    assert plan.placement == "gpu" and plan.warnings == ()
    assert "never pass through RAM" in plan.why


def test_an_8gb_gpu_gets_an_offload_that_fits_colab_ram():
    plan = choose_plan(11.0, 7.5, 1024, 1024)
    assert plan.placement in ("model_offload", "group_offload", "sequential_offload")
    assert plan.estimated_ram_gib <= 11.0


def test_no_gpu_plans_cpu_float32_with_warnings():
    plan = choose_plan(11.0, None, 1024, 1024)
    assert (plan.placement, plan.dtype, plan.device, plan.face_device) == ("cpu", "float32", "cpu", "cpu")
    assert plan.warnings[0].startswith("No CUDA GPU: generation on the CPU is very slow")
    assert "needs about 26.0 GiB RAM but 11.0 GiB is available" in plan.warnings[1]
    assert len(choose_plan(64.0, None).warnings) == 1


def test_nothing_fits_says_so():
    plan = choose_plan(11.0, 3.0, 1024, 1024)
    assert plan.placement == "sequential_offload"
    assert plan.warnings[-1].startswith("Nothing fits: even sequential offload needs about 1.7 GiB VRAM and 12.5 GiB RAM")


def test_activations_scale_with_pixels_and_batch():
    small, large = choose_plan(11.0, 40.0, 768, 768), choose_plan(11.0, 40.0, 1024, 1024)
    assert (small.vae_tiling, large.vae_tiling) == (False, False)
    assert large.estimated_vram_gib - small.estimated_vram_gib == pytest.approx(4.0 * (1 - 0.5625), abs=0.01)
    batch4 = choose_plan(11.0, 40.0, 1024, 1024, batch=4)
    assert batch4.vae_slicing  # decode one image at a time: 4.0 GiB, below the 4-sample CFG denoise (4.0)
    assert batch4.estimated_vram_gib == large.estimated_vram_gib
    batch8 = choose_plan(11.0, 40.0, 1024, 1024, batch=8)
    assert batch8.estimated_vram_gib == pytest.approx(large.estimated_vram_gib + 4.0, abs=0.01)  # denoise: 8.0


def test_old_gpus_are_warned_about():
    assert "no tensor cores" in choose_plan(11.0, 14.7, compute_capability=(6, 0)).warnings[0]


def test_step_down_chain_with_plenty_of_ram():
    plan, chain = choose_plan(24.0, 14.7), []
    while plan is not None:
        chain.append((plan.placement, plan.text_encoder_device, plan.face_device))
        plan = step_down(plan, ram_available_gib=24.0)
    assert chain == [("gpu", "cuda", "cuda"), ("gpu", "cpu", "cpu"), ("model_offload", "cuda", "cuda"),
                     ("group_offload", "cuda", "cuda"), ("sequential_offload", "cuda", "cpu")]


def test_step_down_never_offers_an_offload_that_overflows_ram():
    light = step_down(choose_plan(*FREE_COLAB), ram_available_gib=11.0)
    assert light.placement == "gpu" and light.vae_tiling and light.why.startswith("After running out of GPU memory")
    group = step_down(light, ram_available_gib=11.0)
    assert group.placement == "group_offload" and group.estimated_ram_gib <= 11.0
    assert step_down(group, ram_available_gib=11.0) is None  # sequential would need 12.5 GiB
    assert step_down(choose_plan(11.0, None)) is None


def test_plan_renders_and_serialises():
    plan = choose_plan(*FREE_COLAB)
    assert json.loads(json.dumps(plan.to_dict()))["placement"] == "gpu"
    assert "estimated peak: 11.7 GiB VRAM, 4.1 GiB RAM" in plan.render()
    assert memory.plan_for_this_machine().placement == ("cpu" if not torch.cuda.is_available() else "gpu")


def test_snapshot_numbers_are_consistent():
    snap = memory.snapshot()
    assert 0 < snap.ram_available_gib <= snap.ram_total_gib
    assert 0 < snap.rss_gib < snap.ram_total_gib
    if snap.rss_anon_gib is not None:
        assert 0 < snap.rss_anon_gib <= snap.rss_gib
    data = json.loads(json.dumps(snap.to_dict()))
    assert set(data) == {"ram_total_gib", "ram_available_gib", "rss_gib", "rss_anon_gib", "gpus"}
    assert f"of {snap.ram_total_gib:.1f} GiB available" in snap.render()


def test_stage_recorder_catches_a_short_peak():
    lines = []
    recorder = memory.StageRecorder(interval_s=0.01, log=lines.append)
    with recorder.stage("allocate 200 MiB"):
        block = np.ones(200 * 2**20, dtype=np.uint8)  # touched, so resident
        time.sleep(0.1)
        del block
    record = recorder.records[0]
    assert record.rss_peak_gib - record.rss_after_gib >= 0.18
    if record.rss_anon_peak_gib is not None:
        assert record.rss_anon_peak_gib >= 0.19
    assert lines[0].startswith("allocate 200 MiB")
    assert recorder.render().splitlines()[1] == lines[0]
    with pytest.raises(RuntimeError, match="stages do not nest"):
        with recorder.stage("outer"), recorder.stage("inner"):
            pass


def tiny_sdxl_shaped_vae() -> AutoencoderKL:
    """SDXL's VAE layout (4 levels, sample_size 1024) with 4 channels, so 1024² decodes quickly on CPU."""
    return AutoencoderKL(
        block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=2, latent_channels=4,
        sample_size=1024,
    ).eval()


class Recorder:
    def __init__(self, name):
        self.name, self.calls = name, []

    def __getattr__(self, attribute):
        if attribute not in ("enable_group_offload", "enable_tiling", "to"):
            raise AttributeError(attribute)
        return lambda *args, **kwargs: self.calls.append((attribute, args, kwargs))


class FakePipe:
    def __init__(self, vae, with_group_offload=True):
        self.vae = vae
        self.unet = Recorder("unet")
        self.controlnet = Recorder("controlnet")
        self.text_encoder = torch.nn.Linear(2, 2)
        self.text_encoder_2 = torch.nn.Linear(2, 2)
        self.calls = []
        if not with_group_offload:
            self.unet, self.controlnet = object(), object()

    def enable_sequential_cpu_offload(self):
        self.calls.append("sequential")

    def enable_model_cpu_offload(self):
        self.calls.append("model")


def test_vae_tiling_is_effective_at_1024():
    vae = tiny_sdxl_shaped_vae()
    assert vae.tile_latent_min_size == 128  # unchanged diffusers would not tile a 128x128 latent
    plan = step_down(choose_plan(*FREE_COLAB), ram_available_gib=11.0)
    notes = memory.apply(plan, FakePipe(vae))
    assert (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size) == (True, 512, 64)
    assert "VAE tiles lowered to 512 px so tiling is effective at 1024²" in notes
    tiled = []
    vae.tiled_decode = lambda z, **kw: tiled.append(tuple(z.shape)) or SimpleNamespace(sample=z)
    vae.decode(torch.zeros(1, 4, 128, 128))
    assert tiled == [(1, 4, 128, 128)]


def test_group_offload_goes_on_unet_and_controlnet_not_the_vae():
    vae = Recorder("vae")
    pipe = FakePipe(vae)
    plan = choose_plan(24.0, 5.0)  # group offload, text encoders on CPU (already float32 there)
    notes = memory.apply(plan, pipe)
    for model in (pipe.unet, pipe.controlnet):
        assert ("enable_group_offload", (), {"onload_device": "cuda", "offload_device": "cpu",
                                              "offload_type": "block_level", "num_blocks_per_group": 1}) in model.calls
    assert [c[0] for c in vae.calls] == ["enable_tiling", "to"]
    assert notes[-1].startswith("group offload (block level)")


def test_old_diffusers_falls_back_to_pipeline_level_apis():
    class OldPipe(FakePipe):
        def enable_vae_tiling(self):
            self.calls.append("pipe tiling")

    pipe = OldPipe(object(), with_group_offload=False)
    notes = memory.apply(choose_plan(24.0, 5.0), pipe)
    assert pipe.calls == ["pipe tiling", "sequential"]
    assert "this diffusers has no group offload: using sequential CPU offload instead" in notes
    model = FakePipe(object(), with_group_offload=False)
    model.enable_vae_tiling = lambda: None
    memory.apply(choose_plan(24.0, 10.0), model)
    assert model.calls == ["model"]


def test_untiled_decode_when_the_vram_free_now_holds_it(monkeypatch):
    megapixel = 1024 * 1024
    monkeypatch.setattr(memory, "vram_available_gib", lambda index=None: 4.3)  # a T4 after denoising at 1024²
    assert memory.untiled_decode_fits(megapixel, 1, 2)  # fp16: 2.0 GiB + 1.0 margin <= 4.3
    assert not memory.untiled_decode_fits(megapixel, 2, 2)  # two at once: 4.0 + 1.0 > 4.3
    assert not memory.untiled_decode_fits(megapixel, 1, 4)  # fp32 stock VAE: 4.0 + 1.0 > 4.3
    monkeypatch.setattr(memory, "vram_available_gib", lambda index=None: 2.3)  # +pose: a full ControlNet more
    assert not memory.untiled_decode_fits(megapixel, 1, 2)
    monkeypatch.setattr(memory, "vram_available_gib", lambda index=None: None)
    assert not memory.untiled_decode_fits(megapixel, 1, 2)  # no GPU: the plan's setting stays


@pytest.mark.parametrize("method, on_the_gpu", [
    ("faceid-plusv2", "1.39 GiB of layers beside the UNet on the GPU; CLIP ViT-H/14 1.18 GiB on the CPU"),
    ("pulid", "0.63 GiB of layers beside the UNet on the GPU; EVA02-CLIP-L, IDFormer and parser 1.01 GiB on the CPU"),
])
def test_identity_outlook_says_where_each_method_goes_under_each_plan(method, on_the_gpu):
    """The T4 plan keeps a method's layers on the GPU; stepping down moves them with the UNet, then refuses them."""
    plan = memory.choose_plan(11.0, 14.7)
    said = []
    while plan is not None:
        said.append((plan.placement, memory.identity_outlook(plan)[method]))
        plan = memory.step_down(plan)
    places = dict(said)
    assert places["gpu"].startswith(on_the_gpu)
    assert "on the CPU, moving with the UNet" in places["model_offload"]
    assert places["sequential_offload"].startswith("not available under sequential_offload")
