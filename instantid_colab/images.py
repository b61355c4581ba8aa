"""Every picture a user hands in, as upright 8-bit RGB, or one message that names the file and the fix.

Pillow reads the formats; pillow-heif adds the HEIC/HEIF photos phones take. This module adds what
neither does for us: a correct 16-bit to 8-bit conversion (Pillow's `convert("RGB")` clips 16-bit
grey to white, which hid a clear face), transparency on white, CMYK through its ICC profile, the
first frame of an animation, and one readable error for folders, empty, truncated or non-image files.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

ImageLike = Union[str, Path, Image.Image, np.ndarray]
FORMATS_HINT = "use a JPG, PNG, WebP or HEIC photo"
MAX_PIXELS = 40_000_000  # a 40 MP photo; bigger ones are almost always a wrong file, and slow to decode
MIN_SIDE = 64  # below this no face detector finds a face
HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif")


class ImageInputError(ValueError):
    """A picture that cannot be used; the message names it and says what to do."""


def _register_heif() -> bool:
    """Let Pillow open HEIC/HEIF through pillow-heif when it is installed."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def _is_heif(head: bytes) -> bool:
    return head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


def _open_file(path: Path, what: str) -> Image.Image:
    if not path.exists():
        raise ImageInputError(f"{what}: {path} does not exist. Check the path (and the spelling).")
    if path.is_dir():
        raise ImageInputError(f"{what}: {path} is a folder, not a picture. Point to one photo file in it.")
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError as error:
        raise ImageInputError(f"{what}: {path} cannot be read ({error.strerror}); check its permissions.") from None
    if not head:
        raise ImageInputError(f"{what}: {path} is empty (0 bytes); an upload or copy was interrupted. Use the photo again.")
    heif = _register_heif()
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        if _is_heif(head) and not heif:
            raise ImageInputError(f"{what}: {path} is a HEIC/HEIF photo and pillow-heif is not installed: run "
                                  "`python -m instantid_colab install`, or save the photo as JPG.") from None
        raise ImageInputError(f"{what}: {path} is not a picture ({path.stat().st_size:,} bytes that no image reader "
                              f"recognises); {FORMATS_HINT}.") from None
    except Image.DecompressionBombError as error:
        raise ImageInputError(f"{what}: {path} is too large to open safely ({error}); downscale it.") from None
    check_dimensions(image, what, str(path))  # from the header, before decoding a huge file
    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageInputError(f"{what}: {path} is too large to open safely ({error}); downscale it.") from None
    except (OSError, SyntaxError, ValueError) as error:  # Pillow's truncated/damaged-file errors
        raise ImageInputError(f"{what}: {path} is damaged or cut off ({str(error).splitlines()[0]}); "
                              "copy or download it again, or re-save it from an image viewer.") from None
    return image


def check_dimensions(image: Image.Image, what: str, name: str = "the picture") -> None:
    """Refuse pictures no face detector can use (too small) or that are almost surely the wrong file (huge)."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageInputError(f"{what}: {name} is {width}x{height} ({width * height / 1e6:.0f} MP); the limit is "
                              f"{MAX_PIXELS / 1e6:.0f} MP. Downscale it (a 1-2 MP photo is plenty).")
    if min(width, height) < MIN_SIDE:
        raise ImageInputError(f"{what}: {name} is {width}x{height}; faces need at least {MIN_SIDE} px a side. "
                              "Use a larger photo.")


def _to_8bit(array: np.ndarray) -> np.ndarray:
    """16-bit (or wider) integer and float pictures to 0-255, by their value range, not by clipping."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float64))
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(array * scale, 0, 255).round().astype(np.uint8)
    if array.max(initial=0) > 255:  # 16-bit samples (0-65535), also when Pillow widened them to 32-bit "I"
        return np.clip(array.astype(np.float64) / 257.0, 0, 255).round().astype(np.uint8)
    return np.clip(array, 0, 255).astype(np.uint8)


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """Through the file's own ICC profile when it has one (the plain formula shifts colours), else the formula."""
    profile = image.info.get("icc_profile")
    if profile:
        try:
            return ImageCms.profileToProfile(image, io.BytesIO(profile), ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass
    return image.convert("RGB")


def to_rgb8(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB: EXIF rotation applied, first frame, transparency on white, any bit depth scaled."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
        image = image.copy()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "CMYK":
        return _cmyk_to_rgb(image)
    if image.mode.startswith(("I", "F")):
        return Image.fromarray(_to_8bit(np.asarray(image))).convert("RGB")
    return image.convert("RGB")


def open_image(source: ImageLike, what: str = "image") -> Image.Image:
    """Any picture as upright 8-bit RGB. `what` names it in errors ("face photo", "pose image", ...).

    Accepts a path (whatever Pillow reads, plus HEIC/HEIF with pillow-heif), a PIL image, or a numpy
    array (H×W or H×W×3/4, any integer or float depth). Raises ImageInputError otherwise.
    """
    if isinstance(source, Image.Image):
        check_dimensions(source, what)
        return to_rgb8(source)
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)) or 0 in array.shape:
            raise ImageInputError(f"{what}: an array of shape {array.shape} is not a picture (H×W or H×W×3/4).")
        array = _to_8bit(array)
        check_dimensions(Image.fromarray(array), what)
        return to_rgb8(Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array))
    if isinstance(source, (str, Path)):
        if str(source).strip() == "":
            raise ImageInputError(f"{what}: no file given; {FORMATS_HINT}.")
        return to_rgb8(_open_file(Path(source).expanduser(), what))
    raise ImageInputError(f"{what}: a {type(source).__name__} is not a picture; pass a file path, PIL image or array.")
