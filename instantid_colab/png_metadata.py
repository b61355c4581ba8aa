"""An image's settings as PNG text: `parameters` in the A1111 form many tools read, `instantid` as JSON.

PIL drops text chunks when an image is saved unless they are passed again, so the text travels on the image
(`attach_metadata`) and `save_png` writes it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def _metadata(settings: dict, label: str | None) -> PngInfo:
    """`parameters` in the A1111 text form many tools read, `instantid` as JSON, and the smoke label."""
    info = PngInfo()
    text = ", ".join(f"{key}: {value}" for key, value in settings.items() if key not in ("prompt", "negative_prompt"))
    info.add_text("parameters", f"{settings['prompt']}\nNegative prompt: {settings['negative_prompt']}\n{text}")
    info.add_text("instantid", json.dumps(settings))
    if label:
        info.add_text("label", label)
    return info


def attach_metadata(image: Image.Image, metadata: dict, label: str | None) -> None:
    """`metadata` as the image's PNG text (`save_png`) and in its `info` (kept by the app's gallery)."""
    image.pnginfo = _metadata(metadata, label)
    image.info.update({"instantid": json.dumps(metadata)})


def save_png(image: Image.Image, path: str | Path, overwrite: bool = True) -> Path:
    """Save with the settings/seed metadata that `generate` attached (PIL drops it unless passed again).

    `overwrite=False` never replaces a file (FileExistsError), even one that appeared during generation.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb" if overwrite else "xb") as handle:
        _write_png(image, handle)
    return path


def png_bytes(image: Image.Image) -> bytes:
    """The PNG file `save_png` would write, as bytes (a Ray worker sends them to the one process that writes)."""
    buffer = io.BytesIO()
    _write_png(image, buffer)
    return buffer.getvalue()


def _write_png(image: Image.Image, handle) -> None:
    image.save(handle, format="PNG", pnginfo=getattr(image, "pnginfo", None))
