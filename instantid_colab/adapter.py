"""The InstantID adapter file (`ip-adapter.bin`): read its architecture, check it fits, load it strictly.

The file is IP-Adapter-Plus shaped: `image_proj` holds a Perceiver Resampler (face embedding ->
16 tokens) and `ip_adapter` holds one `to_k_ip`/`to_v_ip` pair per UNet cross-attention layer.
Every hyper-parameter is read from tensor shapes, never assumed: the seeds guessed `dim=2048,
heads=16`, loaded non-strictly and silently ran half-random weights. Loading itself goes
through diffusers' IP-Adapter-Plus converter; this module only adds what diffusers does not do:
reading shapes without loading 1.7 GB, refusing files that do not fit before loading, and checking
afterwards that every tensor landed.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from instantid_colab import library_messages
from instantid_colab.pickles import refused_object

IMAGE_PROJ = "image_proj"
IP_ADAPTER = "ip_adapter"
DIM_HEAD = 64  # diffusers' IPAdapterPlusImageProjection and the official Resampler both use 64
ARCFACE_DIM = 512  # antelopev2's recogniser gives a 512-d identity embedding
OFFICIAL_FILE = "InstantX/InstantID ip-adapter.bin"
_NO_FLOAT32_MODULES = "There are modules in UNet2DConditionModel that should be kept in float32: []."

Shapes = dict[str, dict[str, tuple[int, ...]]]


class AdapterError(ValueError):
    """The adapter file cannot drive this pipeline; the message names keys, shapes and the next step."""


@dataclass(frozen=True)
class ResamplerConfig:
    """Perceiver Resampler hyper-parameters, as the official `Resampler(...)` takes them."""

    dim: int
    depth: int
    dim_head: int
    heads: int
    num_queries: int
    embedding_dim: int
    output_dim: int
    ff_mult: int


# The official InstantID adapter for SDXL (instantid_anchors.md §1).
SDXL_INSTANTID = ResamplerConfig(
    dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=512, output_dim=2048, ff_mult=4
)
# Widths of SDXL's 70 cross-attention layers in `unet.attn_processors` order: file positions
# 1-7 (down_blocks.1) and 109-119 (up_blocks.1) are 640 wide, all others 1280.
SDXL_IP_HIDDEN_SIZES = [640 if (i <= 7 or 109 <= i <= 119) else 1280 for i in range(1, 140, 2)]


@dataclass
class AdapterInfo:
    """What an adapter file holds, read from its tensor shapes."""

    resampler: ResamplerConfig
    ip_layers: int
    ip_hidden_sizes: list[int]
    cross_attention_dim: int  # input width of every to_k_ip/to_v_ip (the UNet's text width)
    dtype: str
    file_format: str  # "pickle" | "safetensors" | "state_dict"
    n_tensors: int
    n_params: int
    path: str | None = None
    shapes: Shapes = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-tensor shape table)."""
        summary = asdict(self)
        summary.pop("shapes")
        return summary


# ---------------------------------------------------------------------------------------------
# Reading


def _is_safetensors(path: Path) -> bool:
    """safetensors starts with an 8-byte header length and a JSON object; decide by content, not suffix."""
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _split_flat(flat: Mapping[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """`image_proj.x` / `ip_adapter.y` keys (the converted/safetensors form) -> nested groups."""
    groups: dict[str, dict[str, Any]] = {IMAGE_PROJ: {}, IP_ADAPTER: {}}
    others = []
    for key, value in flat.items():
        group, _, rest = key.partition(".")
        if group in groups and rest:
            groups[group][rest] = value
        else:
            others.append(key)
    if others:
        raise AdapterError(
            f"{source}: keys outside `image_proj.` / `ip_adapter.`: {others[:5]}"
            f"{' …' if len(others) > 5 else ''}. This is not an InstantID adapter file; "
            f"use {OFFICIAL_FILE} or a file written by convert_adapter()."
        )
    return groups


def _torch_load(path: Path) -> Any:
    """Unpickle with weights_only=True; memory-map zip-format files so shapes cost no RAM."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def _read_groups(source: str | Path | Mapping) -> tuple[dict[str, dict[str, Any]], str, str | None]:
    """Return ({group: {key: tensor, or shape for safetensors}}, file format, path) for a path or a state dict."""
    if isinstance(source, Mapping):
        if IMAGE_PROJ in source or IP_ADAPTER in source:
            groups = {name: dict(source.get(name, {})) for name in (IMAGE_PROJ, IP_ADAPTER)}
        else:
            groups = _split_flat(source, "state dict")
        return groups, "state_dict", None

    path = Path(source)
    if not path.is_file():
        raise AdapterError(f"{path}: no such file. Download {OFFICIAL_FILE} (weights.ensure_weights does).")
    try:
        if _is_safetensors(path):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                flat = {key: _HeaderEntry(handle.get_slice(key)) for key in handle.keys()}
            return _split_flat(flat, str(path)), "safetensors", str(path)
        loaded = _torch_load(path)
    except AdapterError:
        raise
    except pickle.UnpicklingError as error:
        if (refused := refused_object(error)) is None:
            raise AdapterError(_unreadable(path, error)) from None
        raise AdapterError(
            f"{path}: refused: besides tensors it holds a Python object ({refused}), and loading it could run code "
            f"from the file. {OFFICIAL_FILE} holds only tensors ({{'image_proj': ..., 'ip_adapter': ...}}): download "
            "it again, or convert a file you trust with convert_adapter()."
        ) from None
    except Exception as error:  # torch/safetensors raise many types for damaged files
        raise AdapterError(_unreadable(path, error)) from None
    if not isinstance(loaded, Mapping):
        raise AdapterError(f"{path}: holds a {type(loaded).__name__}, not a state dict; use {OFFICIAL_FILE}.")
    return _read_groups(loaded)[0], "pickle", str(path)


def _unreadable(path: Path, error: BaseException) -> str:
    first_line = str(error).splitlines()[0][:200] if str(error) else ""
    return (f"{path}: cannot be read ({type(error).__name__}: {first_line}). The file is truncated, damaged or not a "
            f"PyTorch/safetensors file ({path.stat().st_size:,} bytes; the official file is 1.69 GB). Delete it and "
            "download it again.")


class _HeaderEntry:
    """Shape and dtype of one safetensors tensor, from the header only."""

    _DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}

    def __init__(self, tensor_slice: Any):
        self.shape = tuple(tensor_slice.get_shape())
        self.dtype = self._DTYPES.get(tensor_slice.get_dtype(), tensor_slice.get_dtype().lower())


def _dtype(groups: dict[str, dict[str, Any]]) -> str:
    dtypes = {str(v.dtype).replace("torch.", "") for g in (IMAGE_PROJ, IP_ADAPTER) for v in groups[g].values()}
    return "/".join(sorted(dtypes))


# ---------------------------------------------------------------------------------------------
# Shapes -> configuration


def official_image_proj_shapes(config: ResamplerConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official Resampler's state dict (`ip_adapter/resampler.py`)."""
    dim, inner = config.dim, config.heads * config.dim_head
    shapes = {
        "latents": (1, config.num_queries, dim),
        "proj_in.weight": (dim, config.embedding_dim),
        "proj_in.bias": (dim,),
        "proj_out.weight": (config.output_dim, dim),
        "proj_out.bias": (config.output_dim,),
        "norm_out.weight": (config.output_dim,),
        "norm_out.bias": (config.output_dim,),
    }
    for i in range(config.depth):
        for norm in ("norm1", "norm2"):
            shapes[f"layers.{i}.0.{norm}.weight"] = (dim,)
            shapes[f"layers.{i}.0.{norm}.bias"] = (dim,)
        shapes[f"layers.{i}.0.to_q.weight"] = (inner, dim)
        shapes[f"layers.{i}.0.to_kv.weight"] = (2 * inner, dim)
        shapes[f"layers.{i}.0.to_out.weight"] = (dim, inner)
        shapes[f"layers.{i}.1.0.weight"] = (dim,)
        shapes[f"layers.{i}.1.0.bias"] = (dim,)
        shapes[f"layers.{i}.1.1.weight"] = (dim * config.ff_mult, dim)
        shapes[f"layers.{i}.1.3.weight"] = (dim, dim * config.ff_mult)
    return shapes


def _other_adapter_kind(image_proj: Mapping[str, Any]) -> str | None:
    """Name the IP-Adapter variants that are not Resampler-based, so the error says what the file is."""
    if "proj.weight" in image_proj:
        return "a plain IP-Adapter (CLIP image projection), not an InstantID adapter"
    if "perceiver_resampler.proj_in.weight" in image_proj:
        return "an IP-Adapter FaceID-Plus, not an InstantID adapter"
    if "norm.weight" in image_proj or "proj.3.weight" in image_proj:
        return "an IP-Adapter FaceID / Full-face adapter, not an InstantID adapter"
    return None


def _resampler_config(image_proj: dict[str, tuple[int, ...]], source: str) -> ResamplerConfig:
    needed = ["latents", "proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight"]
    missing = [key for key in needed if key not in image_proj]
    if missing:
        kind = _other_adapter_kind(image_proj)
        raise AdapterError(
            f"{source}: `image_proj` lacks {', '.join(missing)}"
            + (f"; it is {kind}" if kind else "")
            + f". Use {OFFICIAL_FILE}."
        )
    _, num_queries, dim = image_proj["latents"]
    q_rows = image_proj["layers.0.0.to_q.weight"][0]
    if q_rows % DIM_HEAD:
        raise AdapterError(
            f"{source}: layers.0.0.to_q.weight has {q_rows} rows, not a multiple of dim_head {DIM_HEAD}; "
            f"no Resampler with 64-wide heads has this shape. Use {OFFICIAL_FILE}."
        )
    depth = len({int(m.group(1)) for k in image_proj if (m := re.match(r"layers\.(\d+)\.0\.to_q\.weight$", k))})
    return ResamplerConfig(
        dim=dim,
        depth=depth,
        dim_head=DIM_HEAD,
        heads=q_rows // DIM_HEAD,
        num_queries=num_queries,
        embedding_dim=image_proj["proj_in.weight"][1],
        output_dim=image_proj["proj_out.weight"][0],
        ff_mult=image_proj["layers.0.1.1.weight"][0] // dim,
    )


def _compare(expected: Mapping[str, tuple], actual: Mapping[str, tuple]) -> list[str]:
    """Missing / unexpected keys and shape pairs, one line each."""
    problems = [f"missing {key} {list(shape)}" for key, shape in expected.items() if key not in actual]
    problems += [f"unexpected {key} {list(shape)}" for key, shape in actual.items() if key not in expected]
    problems += [
        f"{key}: expected {list(shape)}, file has {list(actual[key])}"
        for key, shape in expected.items()
        if key in actual and tuple(actual[key]) != tuple(shape)
    ]
    return problems


def problem_lines(problems: list[str], limit: int = 12, prefix: str = "") -> str:
    """The first `limit` problems as a bulleted list, and how many more there are."""
    shown = "\n".join(f"  - {prefix}{problem}" for problem in problems[:limit])
    return shown + (f"\n  - ... and {len(problems) - limit} more" if len(problems) > limit else "")


def _ip_layers(ip_adapter: dict[str, tuple[int, ...]], output_dim: int) -> tuple[list[int], list[str]]:
    """Widths of the k/v pairs at odd positions 1, 3, 5, …, plus any gaps or stray keys."""
    pattern = re.compile(r"(\d+)\.to_([kv])_ip\.weight$")
    problems = [f"unexpected ip_adapter.{key}" for key in ip_adapter if not pattern.match(key)]
    positions = sorted({int(pattern.match(key).group(1)) for key in ip_adapter if pattern.match(key)})
    count = (positions[-1] + 1) // 2 if positions else 0
    widths = []
    for position in range(1, 2 * count, 2):
        pair = [ip_adapter.get(f"{position}.to_{kv}_ip.weight") for kv in "kv"]
        for kv, shape in zip("kv", pair):
            if shape is None:
                problems.append(f"missing ip_adapter.{position}.to_{kv}_ip.weight")
            elif len(shape) != 2 or shape[1] != output_dim:
                problems.append(
                    f"ip_adapter.{position}.to_{kv}_ip.weight: {list(shape)}, expected [hidden, {output_dim}]"
                )
        present = [shape for shape in pair if shape is not None]
        widths.append(present[0][0] if present else 0)
        if len(present) == 2 and present[0] != present[1]:
            problems.append(f"ip_adapter.{position}: to_k_ip {list(present[0])} != to_v_ip {list(present[1])}")
    problems += [f"unexpected ip_adapter position {p} (positions are odd)" for p in positions if p % 2 == 0]
    return widths, problems


def inspect_adapter(source: str | Path | Mapping) -> AdapterInfo:
    """Read an adapter's architecture from tensor shapes only (safetensors header / memory-mapped pickle).

    `source` is a path (`ip-adapter.bin` pickle or converted `.safetensors`) or a state dict, nested
    `{"image_proj": …, "ip_adapter": …}` or flat `image_proj.*`/`ip_adapter.*`; meta tensors are fine.
    Raises AdapterError when the file is unreadable or its keys/shapes are not one consistent Resampler
    plus IP layers. Whether it fits a UNet is `check_fits`'s question.
    """
    groups, file_format, path = _read_groups(source)
    name = path or "state dict"
    dtype = _dtype(groups)
    shapes = {group: {key: tuple(value.shape) for key, value in groups[group].items()} for group in (IMAGE_PROJ, IP_ADAPTER)}
    for group in (IMAGE_PROJ, IP_ADAPTER):
        if not shapes[group]:
            raise AdapterError(f"{name}: no `{group}` tensors; this is not an InstantID adapter. Use {OFFICIAL_FILE}.")
    config = _resampler_config(shapes[IMAGE_PROJ], name)
    problems = _compare(official_image_proj_shapes(config), shapes[IMAGE_PROJ])
    widths, ip_problems = _ip_layers(shapes[IP_ADAPTER], config.output_dim)
    problems += ip_problems
    if problems:
        raise AdapterError(_message(name, problems, "the file is incomplete or was saved from a different model."))
    n_params = sum(_numel(shape) for group in shapes.values() for shape in group.values())
    return AdapterInfo(
        resampler=config,
        ip_layers=len(widths),
        ip_hidden_sizes=widths,
        cross_attention_dim=config.output_dim,
        dtype=dtype,
        file_format=file_format,
        n_tensors=sum(len(group) for group in shapes.values()),
        n_params=n_params,
        path=path,
        shapes=shapes,
    )


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _message(name: str, problems: list[str], cause: str, shown: int = 12) -> str:
    lines = [f"{name}: not a usable InstantID adapter."]
    lines += [f"  - {problem}" for problem in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"  - … and {len(problems) - shown} more")
    lines.append(f"Likely cause: {cause}")
    lines.append(f"Next step: use {OFFICIAL_FILE} (SDXL) with an SDXL base model; `python -m instantid_colab inspect FILE` shows what a file holds.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Fit against a UNet


def ip_hidden_sizes_for(unet: torch.nn.Module) -> list[int]:
    """Widths of the UNet's cross-attention layers in `unet.attn_processors` order.

    That order is how both the official loader and diffusers number the file's `ip_adapter` keys
    (position 2k+1 = k-th cross-attention). diffusers treats every processor not named `attn1` as
    cross-attention; the width an IP pair must produce is that attention's key width.
    """
    return [unet.get_submodule(name[: -len(".processor")]).to_k.out_features for name in _cross_attention_names(unet)]


def _cross_attention_names(unet: torch.nn.Module) -> list[str]:
    """Processor names diffusers gives IP-Adapter processors (the Resampler's own attentions excluded)."""
    return [
        name
        for name in unet.attn_processors
        if not (name.endswith("attn1.processor") or "motion_modules" in name or name.startswith("encoder_hid_proj"))
    ]


def _likely_cause(info: AdapterInfo, want_layers: int, want_context: int) -> str:
    if info.resampler.output_dim == 768 and info.ip_layers == 16:
        return "this is a Stable Diffusion 1.5 adapter (output_dim 768, 16 IP layers); InstantID needs the SDXL one."
    if info.resampler.output_dim == 1024:
        return "this is a Stable Diffusion 2.x adapter (output_dim 1024); InstantID needs the SDXL one."
    if info.resampler.embedding_dim != ARCFACE_DIM:
        return (
            f"embedding_dim {info.resampler.embedding_dim} is a CLIP image width: this is an IP-Adapter-Plus, "
            f"not InstantID (which takes the {ARCFACE_DIM}-d ArcFace face embedding)."
        )
    if info.ip_layers < want_layers and info.resampler.output_dim == want_context:
        return f"the file has {info.ip_layers} of {want_layers} IP layers: it is truncated or was cut down."
    return "the adapter was trained for a different UNet than the one loaded."


def check_fits(info: AdapterInfo, unet: torch.nn.Module | None = None) -> None:
    """Raise AdapterError unless the adapter can drive this UNet (default: SDXL) through diffusers.

    Checks: ArcFace input width, output width = the UNet's cross_attention_dim, one IP pair per
    cross-attention layer with the right width, and a Resampler diffusers' IPAdapterPlusImageProjection
    can build (it fixes depth 4, dim_head 64, ffn_ratio 4 and does not read them from the file).
    """
    if unet is None:
        want_widths, want_context, what = SDXL_IP_HIDDEN_SIZES, SDXL_INSTANTID.output_dim, "SDXL"
    else:
        want_widths, want_context, what = ip_hidden_sizes_for(unet), unet.config.cross_attention_dim, "this UNet"
    config, problems = info.resampler, []
    if config.embedding_dim != ARCFACE_DIM:
        problems.append(f"proj_in.weight takes {config.embedding_dim}-d input; the face embedding is {ARCFACE_DIM}-d")
    if config.output_dim != want_context:
        problems.append(f"proj_out.weight gives {config.output_dim}-d tokens; {what} cross_attention_dim is {want_context}")
    if info.ip_layers != len(want_widths):
        problems.append(f"{info.ip_layers} IP layers in the file; {what} has {len(want_widths)} cross-attention layers")
    problems += [
        f"ip_adapter.{2 * k + 1}.to_k_ip.weight: file width {have}, {what} needs {want}"
        for k, (have, want) in enumerate(zip(info.ip_hidden_sizes, want_widths))
        if have != want
    ][:8]
    for name, have, want in (("depth", config.depth, 4), ("ff_mult", config.ff_mult, 4)):
        if have != want:
            problems.append(f"Resampler {name} {have}; diffusers' IPAdapterPlusImageProjection builds {name} {want}")
    if problems:
        raise AdapterError(_message(info.path or "state dict", problems, _likely_cause(info, len(want_widths), want_context)))


def check_resampler(module: torch.nn.Module, info: AdapterInfo) -> None:
    """Raise AdapterError unless `module` (a diffusers IPAdapterPlusImageProjection) has the file's shapes.

    Both sides are compared in diffusers' naming: the file's shapes become the module diffusers would
    build from them (on the meta device, so no memory). This is the check the seeds skipped when they
    built `dim=2048, heads=16` and loaded non-strictly.
    """
    expected = {key: tuple(value.shape) for key, value in _diffusers_resampler(info.resampler).state_dict().items()}
    actual = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    problems = [
        problem.replace("expected", "file needs").replace("file has", "module has")
        for problem in _compare(expected, actual)
    ]
    if problems:
        built = _module_config(actual)
        raise AdapterError(
            _message(
                info.path or "state dict",
                problems,
                f"the Resampler was built with {built}; the file says dim {info.resampler.dim}, heads "
                f"{info.resampler.heads} (to_q rows {info.resampler.heads * DIM_HEAD} / dim_head {DIM_HEAD}), "
                f"depth {info.resampler.depth}, output_dim {info.resampler.output_dim}. Build it from "
                f"inspect_adapter(path).resampler, or let load_adapter() build it.",
            )
        )


def _module_config(shapes: Mapping[str, tuple]) -> str:
    latents = shapes.get("latents", (0, 0, 0))
    q_rows = shapes.get("layers.0.attn.to_q.weight", (0,))[0]
    return f"dim {latents[-1]}, heads {q_rows // DIM_HEAD}"


def _diffusers_resampler(config: ResamplerConfig) -> torch.nn.Module:
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    with torch.device("meta"):
        return IPAdapterPlusImageProjection(
            embed_dims=config.embedding_dim,
            output_dims=config.output_dim,
            hidden_dims=config.dim,
            depth=config.depth,
            dim_head=config.dim_head,
            heads=config.heads,
            num_queries=config.num_queries,
            ffn_ratio=config.ff_mult,
        )


# ---------------------------------------------------------------------------------------------
# Loading


def _tensors(path: str | Path | Mapping, device: torch.device, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors on the UNet's device and dtype, cast one tensor at a time (no fp32 staging copy)."""
    if isinstance(path, Mapping):
        groups = _read_groups(path)[0]
    elif _is_safetensors(Path(path)):
        from safetensors import safe_open

        groups = {IMAGE_PROJ: {}, IP_ADAPTER: {}}
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                group, _, rest = key.partition(".")
                groups[group][rest] = handle.get_tensor(key).to(device=device, dtype=dtype)
        return groups
    else:
        groups = _read_groups(path)[0]
    return {g: {k: v.to(device=device, dtype=dtype) for k, v in groups[g].items()} for g in (IMAGE_PROJ, IP_ADAPTER)}


def load_adapter(pipe: Any, path: str | Path | Mapping) -> AdapterInfo:
    """Inspect, check the fit against `pipe.unet`, load through diffusers' IP-Adapter-Plus loader, verify.

    Tensors go straight to the UNet's device and dtype. Call this before memory offload hooks are
    applied (the UNet must report its real device). Afterwards `pipe.unet.encoder_hid_proj` is the
    Resampler and every cross-attention processor is diffusers' IP-Adapter processor.
    """
    unet = pipe.unet
    info = inspect_adapter(path)
    check_fits(info, unet)
    state_dict = _tensors(path, unet.device, unet.dtype)
    if hasattr(pipe, "load_ip_adapter"):
        # subfolder/weight_name are unused for a dict; image_encoder_folder=None: InstantID feeds
        # face embeddings via `ip_adapter_image_embeds`, there is no CLIP image encoder. diffusers says so on
        # every load, and (0.42) warns about its own cast of the UNet with an empty list of float32 modules.
        with library_messages.without(["diffusers.loaders.ip_adapter", "diffusers.models.modeling_utils"],
                                      ("image_encoder is not loaded", _NO_FLOAT32_MODULES)):
            pipe.load_ip_adapter(state_dict, subfolder="", weight_name="", image_encoder_folder=None)
    else:
        unet._load_ip_adapter_weights([state_dict])
    _verify_loaded(unet, state_dict, info)
    return info


def _verify_loaded(unet: torch.nn.Module, state_dict: dict[str, dict[str, torch.Tensor]], info: AdapterInfo) -> None:
    """Every file tensor landed: nothing left on meta, parameter counts match, values equal.

    diffusers' low-memory loader skips unknown keys and leaves unloaded parameters on the meta
    device instead of failing; this turns either into an AdapterError.
    """
    name = info.path or "state dict"
    layers = getattr(unet.encoder_hid_proj, "image_projection_layers", None)
    if not layers:
        raise AdapterError(_message(name, ["unet.encoder_hid_proj holds no image projection after loading"], "diffusers did not load the Resampler."))
    projection = layers[-1]
    problems = [f"encoder_hid_proj.{key} is still on the meta device" for key, p in projection.named_parameters() if p.is_meta]
    check_resampler(projection, info)
    file_params = sum(t.numel() for t in state_dict[IMAGE_PROJ].values())
    module_params = sum(p.numel() for p in projection.parameters())
    if file_params != module_params:
        problems.append(f"Resampler has {module_params:,} parameters, the file {file_params:,}")
    for key in ("latents", "proj_in.weight", "proj_out.weight", "norm_out.weight"):
        if not torch.equal(projection.state_dict()[key], state_dict[IMAGE_PROJ][key]):
            problems.append(f"encoder_hid_proj.{key} differs from the file's image_proj.{key}")

    processors = unet.attn_processors
    for k, name in enumerate(_cross_attention_names(unet)):
        processor = processors[name]
        position = 2 * k + 1
        for kv in "kv":
            layers = getattr(processor, f"to_{kv}_ip", None)
            weight = layers[-1].weight if layers is not None else None
            if weight is None or weight.is_meta:
                problems.append(f"processor {position} has no loaded to_{kv}_ip")
            elif not torch.equal(weight, state_dict[IP_ADAPTER][f"{position}.to_{kv}_ip.weight"]):
                problems.append(f"processor {position} to_{kv}_ip differs from ip_adapter.{position}.to_{kv}_ip.weight")
    if problems:
        raise AdapterError(_message(name, problems, "diffusers did not load every tensor (a diffusers version this code does not know)."))


def convert_adapter(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16) -> AdapterInfo:
    """Write the official pickle as safetensors with `image_proj.*`/`ip_adapter.*` keys (what diffusers loads).

    fp16 halves the file (1.69 -> 0.85 GB) and later loads are memory-mapped and pickle-free.
    """
    from safetensors.torch import save_file

    info = inspect_adapter(src)
    groups = _read_groups(src)[0]
    flat = {
        f"{group}.{key}": value.to(dtype).contiguous()
        for group in (IMAGE_PROJ, IP_ADAPTER)
        for key, value in groups[group].items()
    }
    metadata = {"format": "pt", "resampler": json.dumps(asdict(info.resampler)), "source": Path(src).name}
    save_file(flat, str(dst), metadata=metadata)
    return inspect_adapter(dst)
