"""Tiny random-weight models with the real structure (smoke: random weights).

`build_smoke_weights(root)` writes every file `pipeline.load_pipeline` reads, in the real folder
layout, so the whole InstantID flow runs offline on CPU in seconds. The images mean nothing; every
place that shows one says SMOKE_LABEL.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

from instantid_colab.weights import ANTELOPEV2_DIR, SMOKE_LABEL, WeightPaths, default_root, model_folder
SMOKE_SIZE = 128  # output side for smoke runs: the tiny models take seconds at 128 px, minutes per step at 1024
_VERSION = 11  # bump when the layout or sizes change, so old smoke folders are rebuilt


def default_smoke_root() -> Path:
    return default_root() / "smoke"


def tiny_resampler_config():
    """The smallest Resampler diffusers' IPAdapterPlusImageProjection can hold (depth 4, 64-wide heads)."""
    from instantid_colab.adapter import ResamplerConfig
    from instantid_colab.smoke.diffusion import TINY_UNET_CONFIG

    return ResamplerConfig(dim=64, depth=4, dim_head=64, heads=1, num_queries=16, embedding_dim=512,
                           output_dim=TINY_UNET_CONFIG["cross_attention_dim"], ff_mult=4)


def write_adapter(path: Path, unet, config, dtype=None, seed: int = 3) -> None:
    """ip-adapter.bin in the official pickle layout (`image_proj` / `ip_adapter`) for this UNet."""
    import torch

    from instantid_colab.smoke.adapter import ip_hidden_sizes_for, official_adapter_state_dict

    state = official_adapter_state_dict(config, ip_hidden_sizes_for(unet), seed=seed, dtype=dtype or torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def write_tiny_lora(folder: Path, sizes, seed: int = 4) -> Path:
    """A LoRA on the UNet's attention projections in diffusers' format (what lcm-lora-sdxl and most style LoRAs are)."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from instantid_colab.smoke.diffusion import build_unet

    unet = build_unet(sizes, seed)
    torch.manual_seed(seed)  # add_adapter draws the LoRA's weights from torch's global generator
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder / "pytorch_lora_weights.safetensors"


def write_speed_loras(root: Path, sizes) -> None:
    """A tiny LoRA for each speed preset, named and placed as `weights.ensure_lora` finds the real one."""
    from instantid_colab.speed import SPEEDS

    for index, preset in enumerate(preset for preset in SPEEDS.values() if preset.lora):
        repo, file = preset.lora
        folder = root / "loras" / repo.replace("/", "--")
        written = write_tiny_lora(folder, sizes, seed=30 + index)
        if written.name != file:
            written.replace(folder / file)


def write_tiny_taesd(root: Path) -> None:
    """A tiny AutoencoderTiny (TAESDXL's architecture, 8 channels a block) where `weights.ensure_taesd` looks."""
    import torch
    from diffusers import AutoencoderTiny

    from instantid_colab.speed import TAESD_REPO

    torch.manual_seed(5)
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8))
    tiny.save_pretrained(root / "previews" / TAESD_REPO.replace("/", "--"))


def write_smoke_controls(root: Path, unet) -> None:
    """Tiny pose/canny/depth ControlNets and annotators where `weights.ensure_controlnet/ensure_annotator` look."""
    from instantid_colab.controls import ANNOTATOR_REPOS, CONTROL_MODELS
    from instantid_colab.smoke.annotators import write_tiny_depth_anything, write_tiny_vitpose
    from instantid_colab.smoke.diffusion import build_identitynet

    for index, (kind, variants) in enumerate(CONTROL_MODELS.items()):
        for variant, model in variants.items():
            build_identitynet(unet, seed=20 + index).save_pretrained(
                root / "controlnets" / model.repo.replace("/", "--"), variant="fp16")
    write_tiny_vitpose(root / "annotators" / ANNOTATOR_REPOS["pose"].replace("/", "--"))
    write_tiny_depth_anything(root / "annotators" / ANNOTATOR_REPOS["depth"].replace("/", "--"))


def write_smoke_judges(weights: WeightPaths) -> None:
    """Tiny AuraFace, SFace and CLIP models where `weights.ensure_judge` looks (the identity benchmark's judges)."""
    import onnx

    from instantid_colab.bench.judges import AURAFACE_FILE, AURAFACE_REPO, CLIP_REPO, SFACE_FILE, SFACE_REPO
    from instantid_colab.smoke.faces import recogniser_model
    from instantid_colab.smoke.judges import write_clip, write_sface

    auraface = model_folder(weights, "judges", AURAFACE_REPO) / AURAFACE_FILE
    auraface.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(recogniser_model(seed=6), str(auraface))  # ArcFace's signature, as AuraFace's glintr100
    write_sface(model_folder(weights, "judges", SFACE_REPO) / SFACE_FILE)
    write_clip(model_folder(weights, "judges", CLIP_REPO))


def build_smoke_weights(root: str | Path | None = None):
    """Write (once) tiny random-weight InstantID files under `root`; returns WeightPaths(smoke=True)."""
    root = Path(root).expanduser() if root is not None else default_smoke_root()
    paths = WeightPaths(
        base=str(root / "base" / "smoke-sdxl"),
        controlnet=root / "InstantID" / "ControlNetModel",
        adapter=root / "InstantID" / "ip-adapter.bin",
        face_root=root / "faces",
        vae=None,
        smoke=True,
    )
    marker = root / "smoke-weights.json"
    if _current(marker):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".building", "w") as lock:  # several processes at once (one per GPU, test workers): one builds
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _current(marker):
            _write_smoke_weights(root, paths)
            marker.write_text(json.dumps({"version": _VERSION, "label": SMOKE_LABEL}))
    return paths


def _current(marker: Path) -> bool:
    return marker.is_file() and json.loads(marker.read_text()).get("version") == _VERSION


def _write_smoke_weights(root: Path, paths: WeightPaths) -> None:
    from instantid_colab.smoke.diffusion import TINY, write_base, write_identitynet
    from instantid_colab.smoke.faceid import write_faceid
    from instantid_colab.smoke.faces import write_smoke_face_models
    from instantid_colab.smoke.photomaker import write_photomaker
    from instantid_colab.smoke.pulid import write_pulid

    unet = write_base(Path(paths.base), TINY)
    write_identitynet(paths.controlnet, unet)
    write_adapter(paths.adapter, unet, tiny_resampler_config())
    write_speed_loras(root, TINY)
    write_tiny_lora(root / "loras" / "smoke", TINY, seed=7)
    write_tiny_taesd(root)
    write_smoke_controls(root, unet)
    write_smoke_judges(paths)
    write_faceid(root, unet)
    write_pulid(root, unet)
    write_photomaker(root, unet)
    face_dir = write_smoke_face_models(paths.face_root, name="antelopev2")
    assert Path(face_dir).resolve() == (paths.face_root / ANTELOPEV2_DIR).resolve(), face_dir


def sample_face_image(size: int = 256, face_color: tuple[int, int, int] = (235, 200, 175)):
    """A dark picture with one bright square "face" that the smoke detector finds (see smoke.faces).

    The smoke SCRFD fires on a bright square 8 strides wide inside a dark ring twice as wide; at
    insightface's 640-pixel detection size a square of a fifth of the image side is such a face at
    stride 16. `face_color` changes the smoke ArcFace embedding (a different "person").
    """
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (24, 22, 30))
    side = size // 5
    left = (size - side) // 2
    ImageDraw.Draw(image).rectangle([left, left, left + side - 1, left + side - 1], fill=face_color)
    return image


def write_sample_people(folder: str | Path) -> Path:
    """A --faces folder of two smoke "people": ann.png (one photo), and bob/ with two photos, so one is held out."""
    folder = Path(folder)
    (folder / "bob").mkdir(parents=True, exist_ok=True)
    sample_face_image().save(folder / "ann.png")
    blue = (150, 210, 240)
    sample_face_image(face_color=blue).save(folder / "bob" / "bob-1.png")
    sample_face_image(320, face_color=blue).save(folder / "bob" / "bob-2.png")
    return folder
