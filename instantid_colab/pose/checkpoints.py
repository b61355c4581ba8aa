"""Read the released ConvNeXtPose checkpoints; the file decides the variant.

Released files (`ConvNeXtPose_{XS,S,M,L}.tar`) are `torch.save` zip archives holding
`{'epoch', 'network', 'optimizer'}` with DataParallel's `module.` prefix. People also unzip them
(a folder with `data.pkl`) or save a bare state dict; all three load here, always with
`weights_only=True` (the optimizer state holds only tensors and plain Python values).
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from instantid_colab.pickles import refused_object
from instantid_colab.pose.model import ConvNeXtPose
from instantid_colab.pose.variants import NUM_JOINTS, VARIANTS, PoseVariant

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_INDEXED_HEAD = re.compile(r"^(head\.deconv_layers_\d)\.([012])\.")
_HEAD_NAMES = {"0": "dwconv", "1": "norm", "2": "pwconv"}
_STEM = "backbone.downsample_layers.0.0.weight"
_HEAD_PW = "head.deconv_layers_1.pwconv.weight"
_FINAL = "head.final_layer.weight"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match a ConvNeXtPose variant."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    variant: str
    depth_dim: int
    head_channels: int
    joints: int
    heatmap_size: int
    params: int  # learnable parameters, BN buffers excluded
    epoch: int | None
    key_format: str  # "named" (deconv_layers_N.dwconv) or "indexed" (deconv_layers_N.0)
    module_prefix: bool
    has_optimizer: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _find_archive_root(folder: Path) -> Path:
    """The folder holding data.pkl: the folder itself or its single child (`snapshot_83.pth/`)."""
    if (folder / "data.pkl").is_file():
        return folder
    roots = [child for child in folder.iterdir() if (child / "data.pkl").is_file()]
    if len(roots) == 1:
        return roots[0]
    raise CheckpointError(
        f"{folder} is a folder but no unzipped checkpoint was found in it: expected data.pkl in it or in "
        f"exactly one sub-folder (found {len(roots)}). Point to the .tar file or to the folder that holds data.pkl."
    )


def _zip_folder(root: Path) -> io.BytesIO:
    """Rebuild the zip that torch.save wrote, in memory, from an unzipped checkpoint folder.

    torch.load has no folder reader; the zip layout is simply `<root name>/<record>`.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            archive.write(file, f"{root.name}/{file.relative_to(root).as_posix()}")
    buffer.seek(0)
    return buffer


def read_checkpoint(path: str | Path) -> object:
    """torch.load (weights_only=True) of a released file, its unzipped folder, or a bare state dict."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint not found: {path}. Download ConvNeXtPose_{{XS,S,M,L}}.tar from the "
                              "official Google Drive folder (medialab-ku/ConvNeXtPose README) and point to it.")
    source = _zip_folder(_find_archive_root(path)) if path.is_dir() else path
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if (refused := refused_object(error)) is None:
            raise CheckpointError(_unreadable(path, error)) from None
        raise CheckpointError(
            f"{path} was refused: besides tensors it holds a Python object ({refused}), and loading it could run "
            "code from the file. A released ConvNeXtPose checkpoint holds only tensors and numbers ({'epoch', "
            "'network', 'optimizer'}). Download ConvNeXtPose_{XS,S,M,L}.tar again from the official Google Drive "
            "folder; if you made and trust this file, load it yourself and save {'network': model.state_dict()}."
        ) from None
    except Exception as error:  # torch raises RuntimeError, EOFError, BadZipFile... for damaged files
        raise CheckpointError(_unreadable(path, error)) from None


def _unreadable(path: Path, error: BaseException) -> str:
    first_line = str(error).splitlines()[0][:200] if str(error) else ""
    return (f"Could not read {path} as a PyTorch checkpoint ({type(error).__name__}: {first_line}). Expected a "
            "ConvNeXtPose_{XS,S,M,L}.tar from the official release (a zip written by torch.save). The file may be "
            "truncated (an interrupted download) or not a checkpoint: download it again and compare its size.")


def extract_state_dict(obj: object) -> tuple[dict[str, torch.Tensor], int | None, bool]:
    """(state dict, epoch, has optimizer) from `{'epoch','network','optimizer'}` or a bare state dict."""
    if isinstance(obj, dict) and isinstance(obj.get("network"), dict):
        epoch = obj.get("epoch")
        return obj["network"], int(epoch) if epoch is not None else None, "optimizer" in obj
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return obj, None, False
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"Not a ConvNeXtPose checkpoint: expected a dict with 'network' or a state dict of "
                          f"tensors, found {keys}.")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, bool]:
    """Strip DataParallel's `module.`; map indexed head keys (`.0/.1/.2`) to the named ones.

    Returns (state dict in this package's names, "named" | "indexed", had `module.` prefix).
    """
    prefixed = any(key.startswith("module.") for key in state_dict)
    out: dict[str, torch.Tensor] = {}
    indexed = False
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        match = _INDEXED_HEAD.match(key)
        if match:
            indexed = True
            key = f"{match.group(1)}.{_HEAD_NAMES[match.group(2)]}.{key[match.end():]}"
        out[key] = value
    return out, "indexed" if indexed else "named", prefixed


def _shape(state_dict: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        sample = ", ".join(list(state_dict)[:5])
        raise CheckpointError(f"Key {key!r} is missing, so this is not a ConvNeXtPose checkpoint "
                              f"(first keys: {sample}).")
    return tuple(state_dict[key].shape)


def infer_variant(state_dict: dict[str, torch.Tensor]) -> PoseVariant:
    """Pick the registry variant from tensor shapes (after checkpoint_filter_fn).

    Backbone (stem width, blocks per stage) and head width narrow it down; final_layer's rows
    (joints x depth_dim) separate S (32) from M (64). The upsampling count comes from the registry.
    """
    stem = _shape(state_dict, _STEM)[0]
    depths = tuple(len({k.split(".")[3] for k in state_dict if k.startswith(f"backbone.stages.{i}.")})
                   for i in range(4))
    head = _shape(state_dict, _HEAD_PW)[0]
    rows = _shape(state_dict, _FINAL)[0]
    found = f"stem width {stem}, blocks {list(depths)}, head width {head}, final_layer rows {rows}"
    same_body = [v for v in VARIANTS.values() if v.dims[0] == stem and v.depths == depths and v.head_channels == head]
    if not same_body:
        raise CheckpointError(f"No ConvNeXtPose variant has {found}. Known: " + "; ".join(
            f"{v.name}: stem {v.dims[0]}, blocks {list(v.depths)}, head {v.head_channels}" for v in VARIANTS.values()))
    for variant in same_body:
        if rows == variant.final_rows:
            return variant
    options = " or ".join(f"{v.name} ({v.joints} joints x depth_dim {v.depth_dim} = {v.final_rows})" for v in same_body)
    guesses = [f"{rows // d} joints x {d}" for d in (32, 64) if rows % d == 0]
    raise CheckpointError(
        f"Checkpoint looks like ConvNeXtPose-{'/'.join(v.name for v in same_body)} ({found}) but final_layer has "
        f"{rows} rows; expected {options}. {rows} = {', '.join(guesses) or 'no whole joint count'}: this benchmark "
        f"needs the {NUM_JOINTS}-joint Human3.6M checkpoints (17 joints + thorax), not a MuCo/MuPoTS (21) or "
        "17-joint model."
    )


def _describe_mismatch(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], variant: PoseVariant) -> str:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    parts = [f"The checkpoint looks like ConvNeXtPose-{variant.name} but does not match it exactly."]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
        if items:
            parts.append(f"{len(items)} {title}: " + "; ".join(items[:6]) + (" ..." if len(items) > 6 else ""))
    parts.append("Use an unmodified released checkpoint (or one saved from this package's model).")
    return " ".join(parts)


def prepare_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read, filter and identify a checkpoint without building a model."""
    state_dict, epoch, has_optimizer = extract_state_dict(read_checkpoint(path))
    state_dict, key_format, prefixed = checkpoint_filter_fn(state_dict)
    variant = infer_variant(state_dict)
    params = sum(t.numel() for k, t in state_dict.items() if not k.endswith(_BN_BUFFERS))
    info = CheckpointInfo(str(path), variant.name, variant.depth_dim, variant.head_channels, variant.joints,
                          variant.heatmap_size, params, epoch, key_format, prefixed, has_optimizer)
    return state_dict, info


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    return prepare_state_dict(path)[1]


def load_pose_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[ConvNeXtPose, CheckpointInfo]:
    """Build the variant the file describes and load it strictly, in eval mode."""
    state_dict, info = prepare_state_dict(path)
    variant = VARIANTS[info.variant]
    model = ConvNeXtPose(variant)
    expected = model.state_dict()
    if set(expected) != set(state_dict) or any(state_dict[k].shape != v.shape for k, v in expected.items()):
        raise CheckpointError(_describe_mismatch(model, state_dict, variant))
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval(), info


def write_released_checkpoint(path: str | Path, model: ConvNeXtPose, *, epoch: int = 0, key_format: str = "named",
                              layout: str = "zip", optimizer_steps: int = 0) -> Path:
    """Write a checkpoint the way the official trainer did (for tests and smoke mode).

    layout "zip": torch.save of {'epoch','network','optimizer'} with `module.` keys, to `path`
    (name it `.tar` like the release); "directory": the same, unzipped into folder `path`;
    "bare": a plain state dict without prefix. `optimizer_steps` > 0 fills AdamW's per-parameter
    state the way a training run does. The zip's inner root is `snapshot_{epoch}.pth`, as in the
    release.
    """
    path = Path(path)
    network = model.state_dict()
    if key_format == "indexed":
        names = {v: k for k, v in _HEAD_NAMES.items()}
        network = {re.sub(r"^(head\.deconv_layers_\d)\.(dwconv|norm|pwconv)\.",
                          lambda m: f"{m.group(1)}.{names[m.group(2)]}.", k): v for k, v in network.items()}
    if layout == "bare":
        torch.save(network, path)
        return path
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(optimizer_steps):
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
    state = {"epoch": epoch, "network": {f"module.{k}": v for k, v in network.items()},
             "optimizer": optimizer.state_dict()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = _rename_zip_root(buffer.getvalue(), f"snapshot_{epoch}.pth")
    if layout == "zip":
        path.write_bytes(data)
    elif layout == "directory":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            archive.extractall(path)
    else:
        raise ValueError(f"layout must be 'zip', 'directory' or 'bare', not {layout!r}")
    return path


def _rename_zip_root(data: bytes, root: str) -> bytes:
    """torch.save to a buffer names the zip root `archive/`; the release used `snapshot_N.pth/`."""
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in source.namelist():
            archive.writestr(f"{root}/{name.split('/', 1)[1]}", source.read(name))
    return out.getvalue()
