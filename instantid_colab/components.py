"""Load one diffusers or transformers model straight onto its device, in its dtype, from safetensors.

One place for the keyword spelling that changed across the versions Colab has shipped: transformers
>= 4.56 takes `dtype=` (and deprecates `torch_dtype=`), diffusers takes `torch_dtype=` on every version
we support (it also reads `dtype=` from 0.35 on).
"""

from __future__ import annotations

from pathlib import Path

import torch
from packaging.version import Version

from instantid_colab.weights import DamagedWeightsError, reading, refetch_hint

TRANSFORMERS_DTYPE_KEYWORD_SINCE = Version("4.56")
SHOWN_KEYS = 5  # keys named in a mismatch message


def dtype_keyword(cls: type) -> str:
    """The dtype keyword `cls.from_pretrained` expects, by the installed library's version."""
    if cls.__module__.startswith("transformers"):
        import transformers

        return "dtype" if Version(transformers.__version__).release >= TRANSFORMERS_DTYPE_KEYWORD_SINCE.release else "torch_dtype"
    return "torch_dtype"


def load(cls: type, path: str | Path, device: str, dtype: torch.dtype, **kwargs):
    """One model straight onto `device` in `dtype`: safetensors, no full CPU/fp32 staging copy.
    A damaged file in its folder is DamagedWeightsError naming it (`weights.reading`); a file whose keys or shapes
    do not fill the model is one too (`strictly_loaded`)."""
    options = {dtype_keyword(cls): dtype, "low_cpu_mem_usage": True, "use_safetensors": True,
               "output_loading_info": True}
    if device != "cpu":
        target = torch.device(device)
        if target.type == "cuda" and target.index is None:  # "cuda" = this process's GPU (one per process in a batch)
            target = torch.device("cuda", torch.cuda.current_device())
        options["device_map"] = {"": target}
    folder = Path(path, kwargs.get("subfolder") or "")
    with reading(f"{cls.__name__}", folder):
        model, info = cls.from_pretrained(path, **options, **kwargs)
    return strictly_loaded(model, info, folder)


def strictly_loaded(model, info: dict, folder: Path):
    """`model`, if its file filled every weight with the right shape. transformers only warns about weights the
    file lacks and leaves them random (a file written by another version that spells its keys otherwise loads
    "fine" and computes noise); before 4.5x, loading with low_cpu_mem_usage does not even list them as missing, only
    the file's keys it did not use as unexpected. So for a transformers model an unused key is an error too (its own
    unused buffers, such as CLIP's position_ids, it leaves out of that list), and the error names the keys, the shapes
    and what to do."""
    problems = {"missing": info.get("missing_keys"), "with another shape": info.get("mismatched_keys")}
    if type(model).__module__.startswith("transformers"):
        problems["in the file but not in the model"] = info.get("unexpected_keys")
    found = [f"{len(keys)} {what} ({', '.join(map(str, list(keys)[:SHOWN_KEYS]))}{', ...' if len(keys) > SHOWN_KEYS else ''})"
             for what, keys in problems.items() if keys]
    if not found:
        return model
    weights_file = min(folder.glob("*.safetensors"), default=folder)
    raise DamagedWeightsError(
        f"{type(model).__name__}: {weights_file} does not fill the model, weights {'; '.join(found)}. Either it is "
        f"not the file of this model, or a version of its library that names the weights otherwise wrote it (load it "
        f"with that version). {refetch_hint(weights_file)}")


def parameter_dtype(model: torch.nn.Module) -> torch.dtype:
    """A model's dtype from its first parameter: diffusers' `.dtype` walks every module, every time."""
    return next(model.parameters()).dtype


def parameter_device(model: torch.nn.Module) -> torch.device:
    """A model's device from its first parameter (`.device` walks every module too)."""
    return next(model.parameters()).device


def pil_image_processor(name: str) -> type:
    """transformers' image processor class `name` in its PIL form: transformers 5 calls that one `{name}Pil` (its
    plain name is the torchvision one there, and raises ImportError without torchvision); before 5 the plain name
    is the PIL one. The same pixels, with or without torchvision, on every version."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
