"""adapter.py: architecture from shapes, strict refusal with names, strict load through diffusers."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.embeddings import IPAdapterPlusImageProjection

from instantid_colab.adapter import (
    AdapterError,
    ResamplerConfig,
    check_fits,
    check_resampler,
    convert_adapter,
    inspect_adapter,
    load_adapter,
)
from instantid_colab.cli import main
from instantid_colab.smoke.diffusion import TINY as SMOKE_SIZES
from instantid_colab.smoke.adapter import (
    FULL_SIZE,
    FULL_SIZE_IP_HIDDEN_SIZES,
    ip_hidden_sizes_for,
    official_adapter_state_dict,
)

SDXL_UNET = dict(
    sample_size=128,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# Tiny SDXL-like UNet in the style of diffusers' own tests, with cross-attention at two widths.
TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=80,
    cross_attention_dim=64,
    norm_num_groups=1,
)
TINY = ResamplerConfig(dim=128, depth=4, dim_head=64, heads=2, num_queries=4, embedding_dim=512, output_dim=64, ff_mult=4)
SD15_PLUS = ResamplerConfig(dim=768, depth=4, dim_head=64, heads=12, num_queries=16, embedding_dim=1024, output_dim=768, ff_mult=4)
SD15_IP_HIDDEN = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]


@pytest.fixture(scope="module")
def official_meta():
    """The full-size official layout on the meta device: real shapes, no memory."""
    return official_adapter_state_dict(FULL_SIZE, FULL_SIZE_IP_HIDDEN_SIZES, device="meta")


def tiny_vae() -> AutoencoderKL:
    """Older diffusers (0.31 at our floor) read the VAE's config when an SDXL pipeline is built: no `vae=None`."""
    return AutoencoderKL(**SMOKE_SIZES.vae)


@pytest.fixture(scope="module")
def tiny_pipe():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=unet, scheduler=EulerDiscreteScheduler(),
    )


def test_inspector_recovers_official_configuration(official_meta):
    info = inspect_adapter(official_meta)
    assert info.resampler == ResamplerConfig(
        dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=512, output_dim=2048, ff_mult=4
    )
    assert info.ip_layers == 70
    assert info.ip_hidden_sizes[:4] == [640] * 4 and info.ip_hidden_sizes[4] == 1280
    assert info.ip_hidden_sizes[54:60] == [640] * 6  # file positions 109-119
    assert info.n_tensors == 51 + 140
    assert info.n_params == 81_978_624 + 340_787_200
    check_fits(info)  # the SDXL expectation


def test_sdxl_unet_cross_attention_order_matches_the_official_positions():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    assert ip_hidden_sizes_for(unet) == FULL_SIZE_IP_HIDDEN_SIZES
    assert len(FULL_SIZE_IP_HIDDEN_SIZES) == 70


def test_sd15_ip_adapter_plus_is_refused_with_the_reason():
    info = inspect_adapter(official_adapter_state_dict(SD15_PLUS, SD15_IP_HIDDEN, device="meta"))
    assert (info.resampler.output_dim, info.ip_layers) == (768, 16)
    with pytest.raises(AdapterError) as error:
        check_fits(info)
    message = str(error.value)
    assert "Stable Diffusion 1.5" in message
    assert "16 IP layers in the file; SDXL has 70" in message
    assert "proj_out.weight gives 768-d tokens; SDXL cross_attention_dim is 2048" in message
    assert "proj_in.weight takes 1024-d input" in message


def test_missing_ip_layer_in_the_middle_is_named(official_meta):
    broken = {"image_proj": official_meta["image_proj"], "ip_adapter": dict(official_meta["ip_adapter"])}
    del broken["ip_adapter"]["13.to_k_ip.weight"], broken["ip_adapter"]["13.to_v_ip.weight"]
    with pytest.raises(AdapterError) as error:
        inspect_adapter(broken)
    assert "missing ip_adapter.13.to_k_ip.weight" in str(error.value)
    assert "missing ip_adapter.13.to_v_ip.weight" in str(error.value)


def test_file_missing_the_last_ip_layers_does_not_fit_sdxl(official_meta):
    cut = {k: v for k, v in official_meta["ip_adapter"].items() if int(k.split(".")[0]) < 137}
    info = inspect_adapter({"image_proj": official_meta["image_proj"], "ip_adapter": cut})
    with pytest.raises(AdapterError) as error:
        check_fits(info)
    assert "68 IP layers in the file; SDXL has 70" in str(error.value)
    assert "truncated" in str(error.value)


def test_missing_resampler_tensor_is_named(official_meta):
    image_proj = {k: v for k, v in official_meta["image_proj"].items() if k != "layers.2.0.to_kv.weight"}
    with pytest.raises(AdapterError, match=r"missing layers\.2\.0\.to_kv\.weight \[2560, 1280\]"):
        inspect_adapter({"image_proj": image_proj, "ip_adapter": official_meta["ip_adapter"]})


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_truncated_file_is_refused(tmp_path, suffix):
    source = tmp_path / "tiny.bin"
    torch.save(official_adapter_state_dict(TINY, [64] * 4), source)
    path = source if suffix == ".bin" else convert_adapter(source, tmp_path / "tiny.safetensors") and tmp_path / "tiny.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="truncated, damaged"):
        inspect_adapter(path)


@pytest.mark.parametrize("heads", [12, 16])
def test_seeds_resampler_cannot_take_the_official_file(official_meta, heads):
    info = inspect_adapter(official_meta)
    with torch.device("meta"):
        seeds = IPAdapterPlusImageProjection(embed_dims=512, output_dims=2048, hidden_dims=2048, heads=heads, num_queries=16)
    with pytest.raises(AdapterError) as error:
        check_resampler(seeds, info)
    message = str(error.value)
    assert "latents: file needs [1, 16, 1280], module has [1, 16, 2048]" in message
    assert f"layers.0.attn.to_q.weight: file needs [1280, 1280], module has [{heads * 64}, 2048]" in message
    assert f"built with dim 2048, heads {heads}; the file says dim 1280, heads 20" in message
    with torch.device("meta"):
        right = IPAdapterPlusImageProjection(embed_dims=512, output_dims=2048, hidden_dims=1280, heads=20, num_queries=16)
    check_resampler(right, info)


def test_pickle_and_converted_safetensors_read_the_same(tmp_path):
    source = tmp_path / "ip-adapter.bin"
    torch.save(official_adapter_state_dict(TINY, [32, 32, 64, 64]), source)
    pickle_info = inspect_adapter(source)
    converted = convert_adapter(source, tmp_path / "ip-adapter.safetensors")
    assert (pickle_info.file_format, pickle_info.dtype) == ("pickle", "float32")
    assert (converted.file_format, converted.dtype) == ("safetensors", "float16")
    assert converted.resampler == pickle_info.resampler == TINY
    assert converted.ip_hidden_sizes == pickle_info.ip_hidden_sizes == [32, 32, 64, 64]


def test_cli_inspect_json_and_refusal(tmp_path, capsys):
    narrow = tmp_path / "narrow.bin"
    torch.save(official_adapter_state_dict(replace(FULL_SIZE, dim=64, heads=1), [8] * 70), narrow)
    assert main(["inspect", str(narrow), "--json"]) == 1  # widths 8 do not fit SDXL
    assert "ip_adapter.1.to_k_ip.weight: file width 8, SDXL needs 640" in capsys.readouterr().err

    sd15 = tmp_path / "sd15.bin"
    torch.save(official_adapter_state_dict(replace(SD15_PLUS, dim=64, heads=1), SD15_IP_HIDDEN), sd15)
    assert main(["inspect", str(sd15)]) == 1
    err = capsys.readouterr().err
    assert "Stable Diffusion 1.5" in err and "Traceback" not in err


def test_cli_inspect_json_for_a_fitting_file(tmp_path, capsys, monkeypatch, official_meta):
    # A fitting full-size file is 1.7 GB; the CLI reads shapes only, so feed it the meta state dict.
    monkeypatch.setattr("instantid_colab.adapter._read_groups", lambda source: (official_meta, "pickle", str(source)))
    assert main(["inspect", "ip-adapter.bin", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resampler"] == {
        "dim": 1280, "depth": 4, "dim_head": 64, "heads": 20, "num_queries": 16,
        "embedding_dim": 512, "output_dim": 2048, "ff_mult": 4,
    }
    assert summary["ip_layers"] == 70 and summary["cross_attention_dim"] == 2048


def test_round_trip_tiny_unet(tmp_path, tiny_pipe, diffusers_said):
    unet = tiny_pipe.unet
    widths = ip_hidden_sizes_for(unet)
    # down 0 (2×1), down 1 (2×2), up 0 (3×2), up 1 (3×1), mid (1×2): diffusers' attn_processors order
    assert widths == [32] * 2 + [64] * 4 + [64] * 6 + [32] * 3 + [64] * 2
    state = official_adapter_state_dict(TINY, widths, seed=3)
    path = tmp_path / "smoke-ip-adapter.bin"
    torch.save(state, path)

    info = load_adapter(tiny_pipe, path)
    assert info.resampler == TINY and info.ip_layers == 17
    assert not [message for message in diffusers_said  # no CLIP image encoder here, by design; nothing kept in fp32
                if "image_encoder is not loaded" in message or "kept in float32: []" in message]

    projection = unet.encoder_hid_proj.image_projection_layers[0]
    assert type(projection).__name__ == "IPAdapterPlusImageProjection"
    image_proj = state["image_proj"]
    assert torch.equal(projection.latents, image_proj["latents"])
    assert torch.equal(projection.proj_in.weight, image_proj["proj_in.weight"])
    assert torch.equal(projection.layers[2].attn.to_q.weight, image_proj["layers.2.0.to_q.weight"])
    to_k, to_v = image_proj["layers.3.0.to_kv.weight"].chunk(2)
    assert torch.equal(projection.layers[3].attn.to_k.weight, to_k)
    assert torch.equal(projection.layers[3].attn.to_v.weight, to_v)
    assert torch.equal(projection.layers[1].ff[1].net[2].weight, image_proj["layers.1.1.3.weight"])

    processors = {n: p for n, p in unet.attn_processors.items() if not n.startswith("encoder_hid_proj")}
    cross = [p for n, p in processors.items() if not n.endswith("attn1.processor")]
    assert {type(p).__name__ for p in cross} == {"IPAdapterAttnProcessor2_0"}
    for k, processor in enumerate(cross):
        assert torch.equal(processor.to_k_ip[0].weight, state["ip_adapter"][f"{2 * k + 1}.to_k_ip.weight"])
        assert torch.equal(processor.to_v_ip[0].weight, state["ip_adapter"][f"{2 * k + 1}.to_v_ip.weight"])


def test_load_refuses_before_touching_the_unet(tiny_pipe):
    wrong = official_adapter_state_dict(TINY, [64] * 17)
    with pytest.raises(AdapterError, match="ip_adapter.1.to_k_ip.weight: file width 64, this UNet needs 32"):
        load_adapter(tiny_pipe, wrong)


def test_a_tensor_that_did_not_land_is_an_error(monkeypatch):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=unet, scheduler=EulerDiscreteScheduler(),
    )
    real_load = pipe.load_ip_adapter

    def load_but_lose_one(state_dict, **kwargs):
        real_load(state_dict, **kwargs)
        processor = unet.attn_processors["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"]
        # A fresh parameter (the loaded one shares storage with the file's tensor, as intended).
        processor.to_v_ip[0].weight = torch.nn.Parameter(torch.zeros_like(processor.to_v_ip[0].weight))

    monkeypatch.setattr(pipe, "load_ip_adapter", load_but_lose_one)
    with pytest.raises(AdapterError, match=r"processor 5 to_v_ip differs from ip_adapter\.5\.to_v_ip\.weight"):
        load_adapter(pipe, official_adapter_state_dict(TINY, ip_hidden_sizes_for(unet)))
