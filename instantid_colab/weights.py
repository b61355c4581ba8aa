"""Getting the InstantID weights onto disk: hub downloads, a Drive cache, size checks, one offline message.

huggingface_hub does the downloading (resume, local-dir metadata, progress bars); this module only
knows WHICH files are needed, WHERE they go, and what to tell the user when they are not there.
Files already on disk are never fetched again, so a folder on Google Drive survives new sessions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from instantid_colab.pickles import refused_object
from instantid_colab.settings import SettingsError

INSTANTID_REPO = "InstantX/InstantID"
FP16_VAE_REPO = "madebyollin/sdxl-vae-fp16-fix"
DEFAULT_BASE = "wangqixun/YamerMIX_v8"  # the official demo's base; its repo holds fp16 safetensors only

# SDXL bases we know the file names of: repo -> diffusers variant of its fp16 safetensors
# (None: the plain file names already are fp16).
BASE_MODELS: dict[str, str | None] = {
    "wangqixun/YamerMIX_v8": None,
    "stabilityai/stable-diffusion-xl-base-1.0": "fp16",
}

# antelopev2 mirrors on the hub (insightface's own download link is dead). Each keeps the files under
# models/antelopev2/, which is exactly insightface's layout below face_root.
ANTELOPEV2_MIRRORS: tuple[tuple[str, str], ...] = (
    ("InstantX/InstantID", "space"),
    ("lithiumice/insightface", "model"),
)
ANTELOPEV2_DIR = "models/antelopev2"
# InstantID needs the detector (boxes + 5 keypoints) and the 512-d ArcFace recogniser only.
ANTELOPEV2_FILES = ("scrfd_10g_bnkps.onnx", "glintr100.onnx")

# Exact sizes in bytes (and sha256 where published in full) of files we know; others are checked non-empty.
KNOWN_SIZES: dict[str, int] = {
    "ControlNetModel/diffusion_pytorch_model.safetensors": 2_502_139_136,
}
KNOWN_SHA256: dict[str, str] = {}

DRIVE_ROOT = Path("/content/drive/MyDrive/instantid-colab/weights")
SMOKE_LABEL = "smoke: random weights"  # beside every picture, table and page made with `smoke`'s tiny random models


@dataclass(frozen=True)
class WeightPaths:
    """Local paths of everything `pipeline.load_pipeline` reads."""

    base: str
    controlnet: Path
    adapter: Path
    face_root: Path
    vae: str | None
    smoke: bool = False


class MissingWeightsError(RuntimeError):
    """Weights are absent and could not be downloaded; the message lists every file and where it goes."""


class DamagedWeightsError(RuntimeError):
    """A weight file on disk is damaged: cut off, the wrong size, or not the format its name says.
    The message names the file and how to fetch it again."""


def refetch_hint(path: Path) -> str:
    """How to replace one damaged file: `download --force` deletes it and fetches it again."""
    return (f"Fetch it again: `python -m instantid_colab download --force {path}` (or delete {path}; it is "
            "downloaded again when next needed).")


def damaged_file(path: Path) -> str | None:
    """Why the weight file at `path` cannot be read as what its name says, or None when it can.

    Reads containers only (the safetensors header against the file size, the ONNX protobuf, the zip
    directory of a torch pickle, a JSON config): what a cut-off or wrong download breaks.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "it is empty (0 bytes)"
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "np"):
                return None
        if path.suffix == ".onnx":
            import onnx

            onnx.load(str(path), load_external_data=False)
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix in (".bin", ".pt", ".pth", ".tar"):
            with path.open("rb") as handle:
                head = handle.read(2)
            if head == b"PK":  # torch.save's zip: a cut-off file has lost its central directory
                with zipfile.ZipFile(path) as archive:
                    archive.infolist()
            elif head[:1] != b"\x80":  # neither a zip nor a pickle (protocol 2+)
                return "neither a PyTorch zip nor a pickle"
    except Exception as error:  # noqa: BLE001 - every reader's own error type means the same: damaged
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}"
    return None


WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".bin", ".json", ".txt", ".pt", ".pth")


@contextlib.contextmanager
def reading(what: str, *places: str | Path) -> Iterator[None]:
    """Load `what` from these files or folders; a failure caused by a damaged file among them, or by a pickle that
    holds code (weights_only refused it), becomes DamagedWeightsError naming that file and how to fetch it again.
    Other failures pass unchanged, and nothing is checked when loading works (the check reads files only after a
    failure)."""
    try:
        yield
    except Exception as error:
        refused = refused_object(error)
        for path in _weight_files(places):
            if refused is not None and path.suffix != ".safetensors":  # torch's advice would be to run its code
                raise DamagedWeightsError(
                    f"{what}: {path} was refused: besides tensors it holds a Python object ({refused}), and loading "
                    f"it could run code from the file, so it was not loaded. This is not the file {what} comes in. "
                    f"{refetch_hint(path)}") from None
            reason = damaged_file(path)
            if reason is not None:
                raise DamagedWeightsError(f"{what}: {path} is damaged ({reason}). {refetch_hint(path)}") from error
        raise


def _weight_files(places: Iterable[str | Path]) -> list[Path]:
    files = []
    for place in map(Path, places):
        if place.is_dir():
            files += sorted(p for p in place.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        elif place.is_file():
            files.append(place)
    return files


@dataclass(frozen=True)
class Source:
    """Files of one hub repo that land in one local folder."""

    repo_id: str
    files: tuple[str, ...]
    local_dir: Path
    repo_type: str = "model"

    def url(self, file: str) -> str:
        prefix = "spaces/" if self.repo_type == "space" else ""
        return f"https://huggingface.co/{prefix}{self.repo_id}/resolve/main/{file}"


# downloader(source, progress) fetches source.files into source.local_dir or raises.
Downloader = Callable[[Source, bool], None]


def hub_downloader(source: Source, progress: bool) -> None:
    """snapshot_download with allow_patterns = exactly the files we need (resumes partial files)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if not progress:
        disable_progress_bars()
    try:
        snapshot_download(source.repo_id, repo_type=source.repo_type, allow_patterns=list(source.files),
                          local_dir=source.local_dir)
    finally:
        if not progress:
            enable_progress_bars()


def base_files(repo_id: str, variant: str | None, with_vae: bool) -> tuple[str, ...]:
    """The files of a diffusers SDXL pipeline repo that loading needs (fp16 safetensors only)."""
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    files = ["model_index.json", "scheduler/scheduler_config.json",
             "unet/config.json", f"unet/diffusion_pytorch_model{suffix}"]
    for encoder in ("text_encoder", "text_encoder_2"):
        files += [f"{encoder}/config.json", f"{encoder}/model{suffix}"]
    for tokenizer in ("tokenizer", "tokenizer_2"):
        files += [f"{tokenizer}/{name}" for name in
                  ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")]
    if with_vae:
        files += ["vae/config.json", f"vae/diffusion_pytorch_model{suffix}"]
    return tuple(files)


def default_root(drive: bool = False) -> Path:
    """Google Drive folder when asked (must be mounted), else $INSTANTID_WEIGHTS or ~/.cache/instantid-colab."""
    if drive:
        if not DRIVE_ROOT.parent.parent.exists():
            raise MissingWeightsError(
                "Google Drive is not mounted. In Colab run: from google.colab import drive; "
                "drive.mount('/content/drive'), then try again (or pass drive=False).")
        return DRIVE_ROOT
    return Path(os.environ.get("INSTANTID_WEIGHTS", "~/.cache/instantid-colab")).expanduser()


def sources(root: Path, base: str = DEFAULT_BASE, fp16_vae: bool = True) -> list[Source]:
    """Everything InstantID needs except antelopev2 (which has mirrors, see `ANTELOPEV2_MIRRORS`)."""
    if base not in BASE_MODELS:
        known = ", ".join(BASE_MODELS)
        raise ValueError(f"unknown SDXL base {base!r}: add it to weights.BASE_MODELS (known: {known})")
    found = [
        Source(INSTANTID_REPO, ("ControlNetModel/config.json", "ControlNetModel/diffusion_pytorch_model.safetensors",
                                "ip-adapter.bin"), root / "InstantID"),
        Source(base, base_files(base, BASE_MODELS[base], with_vae=not fp16_vae), root / "base" / base.replace("/", "--")),
    ]
    if fp16_vae:
        found.append(Source(FP16_VAE_REPO, ("config.json", "diffusion_pytorch_model.safetensors"),
                            root / "vae" / FP16_VAE_REPO.replace("/", "--")))
    return found


def flatten_antelopev2(folder: Path) -> None:
    """Move .onnx files from nested folders (antelopev2/antelopev2/*.onnx after unzipping) up into `folder`.

    insightface only looks at face_root/models/antelopev2/*.onnx; a nested copy gives a confusing
    "no detection model" assertion.
    """
    if not folder.is_dir():
        return
    for onnx in sorted(folder.rglob("*.onnx")):
        if onnx.parent != folder and not (folder / onnx.name).exists():
            shutil.move(str(onnx), folder / onnx.name)
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()


def check_file(path: Path, name: str) -> None:
    """Raise DamagedWeightsError when a file we know is not the size (or hash) it should be, or a
    safetensors file is cut off (its header is read: milliseconds, whatever the file's size)."""
    size = path.stat().st_size
    expected = KNOWN_SIZES.get(name)
    if expected is not None and size != expected:
        raise DamagedWeightsError(
            f"{path} is {size:,} bytes but {name} must be {expected:,} bytes (a partial or wrong download). "
            f"{refetch_hint(path)}")
    if size == 0 or path.suffix == ".safetensors":
        reason = damaged_file(path)
        if reason is not None:
            raise DamagedWeightsError(f"{path} is damaged ({reason}). {refetch_hint(path)}")
    if name in KNOWN_SHA256:
        import hashlib

        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
        if digest.hexdigest() != KNOWN_SHA256[name]:
            raise DamagedWeightsError(f"{path} has sha256 {digest.hexdigest()}, expected {KNOWN_SHA256[name]}. "
                                      f"{refetch_hint(path)}")


def _missing(source: Source) -> list[str]:
    return [file for file in source.files if not (source.local_dir / file).is_file()]


def _fetch(candidates: Iterable[Source], downloader: Downloader, progress: bool, offline: bool) -> tuple[Source, list[str], str]:
    """Try each candidate source until one has all its files; returns (source, still missing, error text)."""
    candidates = list(candidates)
    errors = []
    for source in candidates:
        if not _missing(source):
            return source, [], ""
    if not offline:
        for source in candidates:
            try:
                downloader(source, progress)
            except Exception as error:  # noqa: BLE001 - any hub/network failure ends in the one message below
                errors.append(f"{source.repo_id}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            if not _missing(source):
                return source, [], ""
    first = candidates[0]
    return first, _missing(first), "; ".join(errors)


def ensure_weights(root: str | Path | None = None, *, base: str = DEFAULT_BASE, fp16_vae: bool = True,
                   drive: bool = False, offline: bool | None = None, downloader: Downloader = hub_downloader,
                   progress: bool = True) -> WeightPaths:
    """Make sure every InstantID file is on disk under `root` (downloading what is missing) and return paths.

    Raises MissingWeightsError once, listing every missing file with its URL and expected path, when
    the hub cannot be reached (offline=True, HF_HUB_OFFLINE=1, or network errors).
    """
    root = Path(root).expanduser() if root is not None else default_root(drive)
    offline = _offline(offline)
    face_root = root / "faces"
    flatten_antelopev2(face_root / ANTELOPEV2_DIR)
    face_sources = [Source(repo, tuple(f"{ANTELOPEV2_DIR}/{f}" for f in ANTELOPEV2_FILES), face_root, repo_type)
                    for repo, repo_type in ANTELOPEV2_MIRRORS]

    missing_lines, errors = [], []
    for candidates in [[s] for s in sources(root, base, fp16_vae)] + [face_sources]:
        source, missing, error = _fetch(candidates, downloader, progress, offline)
        if error:
            errors.append(error)
        if source in face_sources:
            flatten_antelopev2(face_root / ANTELOPEV2_DIR)
            missing = _missing(source)
        missing_lines += [f"  {source.url(f)}\n    -> {source.local_dir / f}" for f in missing]
    if missing_lines:
        reason = "offline mode is on" if offline else "the Hugging Face hub could not be reached"
        detail = f" ({'; '.join(errors)})" if errors else ""
        raise MissingWeightsError(
            f"InstantID weights are missing and {reason}{detail}. Download these files and put each at the "
            f"path shown (or connect to the internet and run `python -m instantid_colab download`):\n"
            + "\n".join(missing_lines))

    all_sources = sources(root, base, fp16_vae)
    for source in all_sources:
        for file in source.files:
            check_file(source.local_dir / file, file)
    instantid, base_source = all_sources[0], all_sources[1]
    return WeightPaths(
        base=str(base_source.local_dir),
        controlnet=instantid.local_dir / "ControlNetModel",
        adapter=instantid.local_dir / "ip-adapter.bin",
        face_root=face_root,
        vae=str(all_sources[2].local_dir) if fp16_vae else None,
    )


def forget(files: Iterable[str | Path], root: Path) -> list[Path]:
    """Delete these weight files so that the next download fetches them again; each must lie under `root`
    (a path relative to `root` is accepted too). Returns what was deleted; SettingsError names a file outside."""
    root = Path(root).expanduser().resolve()
    deleted = []
    for name in files:
        path = Path(name).expanduser()
        if not path.is_absolute() and not path.exists():
            path = root / path
        path = path.resolve()
        if not path.is_relative_to(root):
            raise SettingsError([f"--force {name}: only files under the weights folder {root} are deleted and "
                                 "fetched again; give the path printed in the error message"])
        if path.is_dir():
            raise SettingsError([f"--force {name}: {path} is a folder; give one file in it"])
        if path.is_file():
            path.unlink()
            deleted.append(path)
    return deleted


def root_of(weights: WeightPaths) -> Path:
    """The weights folder a WeightPaths came from (InstantID/ControlNetModel sits two levels below it)."""
    return Path(weights.controlnet).parent.parent


def _offline(offline: bool | None) -> bool:
    return offline if offline is not None else os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _ensure(source: Source, what: str, downloader: Downloader, progress: bool, offline: bool | None) -> None:
    """Every file of `source` on disk (downloaded when missing), or MissingWeightsError saying where to put it."""
    source, missing, error = _fetch([source], downloader, progress, _offline(offline))
    if missing:
        places = "\n".join(f"  {source.url(file)}\n    -> {source.local_dir / file}" for file in missing)
        raise MissingWeightsError(
            f"{what} is missing and could not be downloaded{f' ({error})' if error else ''}. Download these files and "
            f"put each at the path shown:\n{places}")
    for file in source.files:
        check_file(source.local_dir / file, file)


def model_folder(weights: WeightPaths, kind: str, repo: str) -> Path:
    """Where a hub repo of one kind ("previews", "annotators", "judges", ...) lives under the weights folder."""
    return root_of(weights) / kind / repo.replace("/", "--")


def ensure_taesd(weights: WeightPaths, repo: str, files: tuple[str, ...], *, downloader: Downloader = hub_downloader,
                 progress: bool = True, offline: bool | None = None) -> Path:
    """Folder of the tiny preview decoder (TAESDXL, a few MB), fetched the first time previews are asked for."""
    folder = model_folder(weights, "previews", repo)
    _ensure(Source(repo, files, folder), f"The preview decoder {repo} (turn previews off to go without it)",
            downloader, progress, offline)
    return folder


CONTROLNET_FILE = "diffusion_pytorch_model.fp16.safetensors"  # what ControlNetModel loads with variant="fp16"


def ensure_controlnet(weights: WeightPaths, repo: str, download: str, *, downloader: Downloader = hub_downloader,
                      progress: bool = True, offline: bool | None = None) -> Path:
    """Folder of an extra ControlNet holding config.json and its fp16 safetensors, fetched once.

    A repo that publishes only a pickled fp32 `.bin` (thibaud's openpose: 5 GB) is converted once to
    fp16 safetensors (2.5 GB, memory-mapped loads) and the `.bin` deleted, on Drive too.
    """
    folder = model_folder(weights, "controlnets", repo)
    if (folder / "config.json").is_file() and (folder / CONTROLNET_FILE).is_file():
        return folder
    _ensure(Source(repo, ("config.json", download), folder), f"The ControlNet {repo}", downloader, progress, offline)
    if download != CONTROLNET_FILE:
        _pickle_to_fp16_safetensors(folder / download, folder / CONTROLNET_FILE)
    return folder


def _pickle_to_fp16_safetensors(source: Path, target: Path) -> None:
    """Pickled state dict (loaded weights_only, memory-mapped) -> fp16 safetensors, written then renamed."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(source, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(source))
    partial = target.with_suffix(".partial")
    save_file({key: value.to(torch.float16).contiguous() for key, value in state.items()}, str(partial))
    partial.replace(target)
    source.unlink()


def ensure_annotator(weights: WeightPaths, repo: str, files: tuple[str, ...], *, downloader: Downloader = hub_downloader,
                     progress: bool = True, offline: bool | None = None) -> Path:
    """Folder of a transformers annotator model (pose or depth), fetched once."""
    folder = model_folder(weights, "annotators", repo)
    _ensure(Source(repo, files, folder), f"The annotator {repo}", downloader, progress, offline)
    return folder


def ensure_judge(weights: WeightPaths, repo: str, files: tuple[str, ...], *, downloader: Downloader = hub_downloader,
                 progress: bool = True, offline: bool | None = None) -> Path:
    """Folder of a model the identity benchmark scores pictures with (never one that makes them), fetched once."""
    folder = model_folder(weights, "judges", repo)
    _ensure(Source(repo, files, folder), f"The benchmark's judge {repo}", downloader, progress, offline)
    return folder


def lora_file(weights: WeightPaths, name: str) -> Path:
    """A requested LoRA as a file on disk (`smoke` is the smoke weights' tiny LoRA); MissingWeightsError otherwise."""
    from instantid_colab.loras import SMOKE_LORA

    if name == SMOKE_LORA and weights.smoke:
        return root_of(weights) / "loras" / SMOKE_LORA / "pytorch_lora_weights.safetensors"
    return ensure_lora(weights, name)


def ensure_lora(weights: WeightPaths, name: str, *, downloader: Downloader = hub_downloader, progress: bool = True,
                offline: bool | None = None) -> Path:
    """A LoRA file: a local .safetensors, or a hub repo `owner/name` (its one .safetensors) or `owner/name/file`.
    A name that exists on disk, starts like a path (/, ., ~) or is a .safetensors name of fewer than three parts
    is a local file; `owner/name/file.safetensors` that is not on disk is on the hub."""
    local = Path(name).expanduser()
    parts = name.strip("/").split("/")
    if local.exists() or name.startswith(("/", ".", "~")) or (local.suffix == ".safetensors" and len(parts) < 3):
        if not local.is_file():
            raise MissingWeightsError(f"LoRA {name}: no such file. Give a .safetensors file or a hub id owner/name.")
        return local
    if len(parts) < 2:
        raise MissingWeightsError(f"LoRA {name!r} is neither a .safetensors file nor a hub id owner/name.")
    repo, file = "/".join(parts[:2]), "/".join(parts[2:])
    folder = model_folder(weights, "loras", repo)
    if not file:
        found = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        if not found and not _offline(offline):
            try:
                downloader(Source(repo, ("*.safetensors",), folder), progress)
            except Exception as error:  # noqa: BLE001 - reported below with what to do
                raise MissingWeightsError(f"LoRA {repo} could not be downloaded ({type(error).__name__}: {error}). "
                                          f"Put its .safetensors file in {folder}, or give a local file.") from None
            found = sorted(folder.glob("*.safetensors"))
        if len(found) != 1:
            listed = ", ".join(path.name for path in found) or "none on disk"
            raise MissingWeightsError(f"LoRA {repo}: expected one .safetensors file ({listed}); name it as "
                                      f"{repo}/FILE.safetensors, or put the file in {folder}.")
        return found[0]
    _ensure(Source(repo, (file,), folder), f"The LoRA {name}", downloader, progress, offline)
    return folder / file
