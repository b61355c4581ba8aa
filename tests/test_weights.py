import re
import struct
from pathlib import Path

import pytest

from instantid_colab import weights
from instantid_colab.weights import DamagedWeightsError, MissingWeightsError, ensure_weights


def _expected_files(root: Path) -> list[Path]:
    files = [s.local_dir / f for s in weights.sources(root) for f in s.files]
    return files + [root / "faces" / weights.ANTELOPEV2_DIR / f for f in weights.ANTELOPEV2_FILES]


def _file_bytes(name: str, size: int) -> bytes:
    """`size` bytes; a .safetensors file is a valid empty one (an 8-byte header length, then `{}` padded)."""
    if name.endswith(".safetensors"):
        return struct.pack("<Q", size - 8) + b"{}" + b" " * (size - 10)
    return b"x" * size


def _writer(sizes: dict[str, int] | None = None, fail: set[str] = frozenset()):
    """A fake hub: writes every requested file (tiny) unless the repo is in `fail`; records calls."""
    calls = []

    def download(source, progress):
        calls.append(source.repo_id)
        if source.repo_id in fail:
            raise ConnectionError(f"cannot reach {source.repo_id}")
        for file in source.files:
            path = source.local_dir / file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_file_bytes(file, (sizes or {}).get(file, 16)))

    download.calls = calls
    return download


def test_unreachable_hub_gives_one_message_listing_every_missing_file(tmp_path):
    def offline_hub(source, progress):
        raise ConnectionError("Name or service not known")

    with pytest.raises(MissingWeightsError) as caught:
        ensure_weights(tmp_path, downloader=offline_hub, progress=False)
    message = str(caught.value)
    assert "could not be reached" in message and "ConnectionError" in message
    for path in _expected_files(tmp_path):
        assert f"-> {path}" in message
    assert message.count("-> ") == len(_expected_files(tmp_path))
    assert "https://huggingface.co/InstantX/InstantID/resolve/main/ip-adapter.bin" in message
    assert "https://huggingface.co/spaces/InstantX/InstantID/resolve/main/models/antelopev2/glintr100.onnx" in message


def test_offline_mode_never_calls_the_hub(tmp_path):
    hub = _writer()
    with pytest.raises(MissingWeightsError, match="offline mode is on"):
        ensure_weights(tmp_path, downloader=hub, offline=True)
    assert hub.calls == []


def test_wrong_size_names_the_file_and_both_sizes(tmp_path):
    with pytest.raises(DamagedWeightsError) as caught:
        ensure_weights(tmp_path, downloader=_writer(), progress=False)
    message = str(caught.value)
    assert "ControlNetModel/diffusion_pytorch_model.safetensors" in message
    assert "is 16 bytes" in message and "2,502,139,136 bytes" in message


def test_complete_download_returns_paths_and_second_call_downloads_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "KNOWN_SIZES", {"ControlNetModel/diffusion_pytorch_model.safetensors": 32})
    sizes = {"ControlNetModel/diffusion_pytorch_model.safetensors": 32}
    hub = _writer(sizes)
    paths = ensure_weights(tmp_path, downloader=hub, progress=False)
    assert paths.controlnet == tmp_path / "InstantID" / "ControlNetModel"
    assert paths.adapter == tmp_path / "InstantID" / "ip-adapter.bin"
    assert Path(paths.base, "unet", "diffusion_pytorch_model.safetensors").is_file()  # YamerMIX: fp16 without variant
    assert Path(paths.vae, "config.json").is_file() and not paths.smoke
    assert (paths.face_root / "models" / "antelopev2" / "glintr100.onnx").is_file()
    assert hub.calls == ["InstantX/InstantID", "wangqixun/YamerMIX_v8", "madebyollin/sdxl-vae-fp16-fix",
                         "InstantX/InstantID"]
    hub.calls.clear()
    assert ensure_weights(tmp_path, downloader=hub) == paths
    assert hub.calls == []


def test_antelopev2_falls_back_to_the_next_mirror_and_base_variant(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "KNOWN_SIZES", {})
    first_mirror = weights.ANTELOPEV2_MIRRORS[0][0]
    calls = []

    def hub(source, progress):
        calls.append((source.repo_id, source.repo_type))
        if source.repo_type == "space" and source.repo_id == first_mirror:
            raise ConnectionError("space is sleeping")
        _writer()(source, progress)

    paths = ensure_weights(tmp_path, base="stabilityai/stable-diffusion-xl-base-1.0", downloader=hub)
    assert ("lithiumice/insightface", "model") in calls
    assert Path(paths.base, "unet", "diffusion_pytorch_model.fp16.safetensors").is_file()


def test_nested_antelopev2_folder_is_flattened(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "KNOWN_SIZES", {})
    hub = _writer()
    for source in weights.sources(tmp_path):
        hub(source, False)
    nested = tmp_path / "faces" / "models" / "antelopev2" / "antelopev2"
    nested.mkdir(parents=True)
    for name in weights.ANTELOPEV2_FILES:
        (nested / name).write_bytes(b"onnx")
    paths = ensure_weights(tmp_path, downloader=hub, offline=True)
    folder = paths.face_root / "models" / "antelopev2"
    assert sorted(p.name for p in folder.iterdir()) == sorted(weights.ANTELOPEV2_FILES)
    assert not nested.exists()


def test_unknown_base_is_refused_with_the_known_list(tmp_path):
    with pytest.raises(ValueError, match="stabilityai/stable-diffusion-xl-base-1.0"):
        ensure_weights(tmp_path, base="someone/sd15", downloader=_writer())


def _paths(root: Path) -> weights.WeightPaths:
    return weights.WeightPaths(base=str(root / "base"), controlnet=root / "InstantID" / "ControlNetModel",
                               adapter=root / "InstantID" / "ip-adapter.bin", face_root=root / "faces", vae=None)


def test_a_pickled_fp32_controlnet_is_converted_once_to_fp16_safetensors(tmp_path):
    """thibaud's openpose ControlNet ships only a 5 GB fp32 .bin: it is converted and the .bin deleted."""
    import json

    import torch
    from safetensors.torch import load_file

    state = {"conv_in.weight": torch.randn(4, 4, 3, 3), "time_embedding.linear_1.bias": torch.randn(8)}

    def hub(source, progress):
        hub.calls.append(source.files)
        source.local_dir.mkdir(parents=True, exist_ok=True)
        (source.local_dir / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
        torch.save(state, source.local_dir / "diffusion_pytorch_model.bin")

    hub.calls = []
    folder = weights.ensure_controlnet(_paths(tmp_path), "thibaud/controlnet-openpose-sdxl-1.0",
                                       "diffusion_pytorch_model.bin", downloader=hub, progress=False)
    assert folder == tmp_path / "controlnets" / "thibaud--controlnet-openpose-sdxl-1.0"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", weights.CONTROLNET_FILE]
    converted = load_file(str(folder / weights.CONTROLNET_FILE))
    assert all(value.dtype == torch.float16 for value in converted.values())
    assert torch.equal(converted["conv_in.weight"], state["conv_in.weight"].half())
    weights.ensure_controlnet(_paths(tmp_path), "thibaud/controlnet-openpose-sdxl-1.0", "diffusion_pytorch_model.bin",
                              downloader=hub, progress=False)
    assert hub.calls == [("config.json", "diffusion_pytorch_model.bin")]  # the second call found it on disk


def test_missing_controlnet_and_annotator_say_where_to_put_them(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"The ControlNet diffusers/controlnet-canny-sdxl-1.0-small is missing"
                                                  r"(.|\n)*controlnets/diffusers--controlnet-canny-sdxl-1.0-small/config.json"):
        weights.ensure_controlnet(_paths(tmp_path), "diffusers/controlnet-canny-sdxl-1.0-small",
                                  weights.CONTROLNET_FILE, offline=True)
    with pytest.raises(MissingWeightsError, match=r"The annotator depth-anything/Depth-Anything-V2-Small-hf is missing"):
        weights.ensure_annotator(_paths(tmp_path), "depth-anything/Depth-Anything-V2-Small-hf", ("config.json",),
                                 offline=True)


def test_a_cut_off_safetensors_file_is_refused_with_the_command_that_fetches_it_again(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "KNOWN_SIZES", {})
    ensure_weights(tmp_path, downloader=_writer(), progress=False)
    unet = tmp_path / "base" / "wangqixun--YamerMIX_v8" / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:12])
    with pytest.raises(DamagedWeightsError) as caught:
        ensure_weights(tmp_path, downloader=_writer(), progress=False)
    assert str(caught.value).startswith(f"{unet} is damaged (SafetensorError: ")
    assert f"`python -m instantid_colab download --force {unet}`" in str(caught.value)


def test_download_force_deletes_the_file_and_the_next_download_fetches_only_its_repo(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "KNOWN_SIZES", {})
    ensure_weights(tmp_path, downloader=_writer(), progress=False)
    unet = tmp_path / "base" / "wangqixun--YamerMIX_v8" / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.forget([unet], tmp_path) == [unet] and not unet.exists()
    hub = _writer()
    ensure_weights(tmp_path, downloader=hub, progress=False)
    assert hub.calls == ["wangqixun/YamerMIX_v8"] and unet.is_file()
    relative = Path("InstantID") / "ip-adapter.bin"
    assert weights.forget([relative], tmp_path) == [tmp_path / relative]  # relative to the weights folder


def test_download_force_never_deletes_outside_the_weights_folder(tmp_path):
    from instantid_colab.settings import SettingsError

    (tmp_path / "w").mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(SettingsError, match=r"--force .*notes\.txt: only files under the weights folder"):
        weights.forget([notes], tmp_path / "w")
    with pytest.raises(SettingsError, match=r"is a folder; give one file in it"):
        weights.forget([tmp_path / "w"], tmp_path / "w")
    assert notes.read_text() == "mine"


def test_reading_names_the_damaged_file_and_lets_other_failures_through(tmp_path):
    import torch

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(8)}, folder / "pytorch_model.bin")
    with pytest.raises(KeyError):  # intact files: the loader's own error is not ours to rename
        with weights.reading("the test model", folder):
            raise KeyError("w")
    pickled = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(pickled[: len(pickled) // 2])  # a cut-off torch zip
    with pytest.raises(DamagedWeightsError, match=r"^the test model: .*pytorch_model\.bin is damaged \(BadZipFile"):
        with weights.reading("the test model", folder):
            raise RuntimeError("PytorchStreamReader failed reading zip archive")
    (folder / "config.json").write_text("{not json")
    assert weights.damaged_file(folder / "config.json").startswith("JSONDecodeError")
    (folder / "model.onnx").write_bytes(b"")
    assert weights.damaged_file(folder / "model.onnx") == "it is empty (0 bytes)"


def test_a_hub_lora_named_with_its_file_is_fetched_from_the_hub(tmp_path):
    """`--lora owner/name/file.safetensors` (README) was taken for a missing local file."""
    hub = _writer()
    path = weights.ensure_lora(_paths(tmp_path), "ByteDance/SDXL-Lightning/sdxl_lightning_4step_lora.safetensors",
                               downloader=hub, progress=False)
    assert path == tmp_path / "loras" / "ByteDance--SDXL-Lightning" / "sdxl_lightning_4step_lora.safetensors"
    assert hub.calls == ["ByteDance/SDXL-Lightning"] and path.is_file()
    with pytest.raises(MissingWeightsError, match=r"LoRA styles/mine.safetensors: no such file"):
        weights.ensure_lora(_paths(tmp_path), "styles/mine.safetensors", downloader=hub)


def test_a_text_encoder_file_that_does_not_fill_the_model_is_refused_naming_the_keys(tmp_path):
    """transformers leaves weights the file lacks random and only warns; a smoke file written by transformers 5
    (keys without `text_model.`) read that way by transformers 4 computed noise in the floors' CI stage."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from instantid_colab.components import load
    from instantid_colab.smoke.diffusion import save_text_encoder

    config = CLIPTextConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=16, projection_dim=8)
    model = CLIPTextModel(config).eval()
    save_text_encoder(model, tmp_path / "text_encoder")
    (path,) = (tmp_path / "text_encoder").glob("*.safetensors")
    tensors = load_file(path)
    assert all(key.startswith("text_model.") for key in tensors)  # as SDXL's own files spell them
    loaded = load(CLIPTextModel, tmp_path, "cpu", torch.float32, subfolder="text_encoder")
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(tokens).last_hidden_state, model(tokens).last_hidden_state)

    tensors["text_model.encoder.layers.0.mlp.fc1.wrong_name"] = tensors.pop("text_model.encoder.layers.0.mlp.fc1.weight")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(DamagedWeightsError) as caught:
        load(CLIPTextModel, tmp_path, "cpu", torch.float32, subfolder="text_encoder")
    message = str(caught.value)
    assert message.startswith(f"CLIPTextModel: {path} does not fill the model, weights ")
    assert re.search(r"1 in the file but not in the model \((text_model\.)?encoder\.layers\.0\.mlp\.fc1\.wrong_name\)",
                     message)  # transformers 5 names the keys without the prefix, and also lists fc1.weight missing
    assert f"`python -m instantid_colab download --force {path}`" in message
