"""Every picture a user hands in, as upright 8-bit RGB, or one message that names the file and the fix.

Pillow reads the formats; pillow-heif adds the HEIC/HEIF photos phones take. This module adds what
neither does for us: a correct 16-bit to 8-bit conversion (Pillow's `convert("RGB")` clips 16-bit
grey to white, which hid a clear face), transparency on white, CMYK through its ICC profile, the
first frame of an animation, one readable error for folders, empty, truncated or non-image files,
and big photos decoded at the size the work needs, not at full size: a big JPEG at 1/2, 1/4 or 1/8
scale by libjpeg itself (Pillow's draft mode), other formats reduced right after decoding (`thumbnail`).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from instantid_colab.settings import check_arguments

ImageLike = Union[str, Path, Image.Image, np.ndarray]
FORMATS_HINT = "use a JPG, PNG, WebP or HEIC photo"
# Pillow refuses pictures above 2 x Image.MAX_IMAGE_PIXELS as decompression bombs: 179 MP by default, less
# than the 200 MP photos phones take (16320x12240). For this process (gradio opens uploads with Pillow too)
# the bomb limit is raised to MAX_PIXELS; above it a picture is still refused, by Pillow's own check.
MAX_PIXELS = 256_000_000
if Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2
MIN_SIDE = 64  # below this no face detector finds a face
# The largest side any step needs: face detection and its ArcFace crop work on at most 2048 px
# (faces.MAX_DETECT_SIDE), outputs and control maps are at most 1280. Bigger photos are decoded smaller.
WORKING_SIDE = 2048
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


def _open_file(path: Path, what: str, max_side: int | None) -> Image.Image:
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
        with warnings.catch_warnings():  # Pillow warns from half its bomb limit on: such photos are wanted here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except UnidentifiedImageError:
        if _is_heif(head) and not heif:
            raise ImageInputError(f"{what}: {path} is a HEIC/HEIF photo and pillow-heif is not installed: run "
                                  "`python -m instantid_colab install`, or save the photo as JPG.") from None
        raise ImageInputError(f"{what}: {path} is not a picture ({path.stat().st_size:,} bytes that no image reader "
                              f"recognises); {FORMATS_HINT}.") from None
    except Image.DecompressionBombError as error:
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        detail = f"{int(pixels[1]) / 1e6:.0f} MP" if pixels else "larger"
        raise ImageInputError(_too_large(what, str(path), detail)) from None
    check_dimensions(image, what, str(path))  # from the header, before decoding a huge file
    if max_side is not None and max(image.size) > max_side and image.format == "JPEG":
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale: the smallest one whose long side is still at least
        # max_side / 2 (a 12 MP photo at 1/2, 48 MP at 1/4, 200 MP at 1/8: each about 2000 px wide).
        scale = max_side / 2 / max(image.size)
        image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:  # Pillow's truncated/damaged-file errors
        raise ImageInputError(f"{what}: {path} is damaged or cut off ({str(error).splitlines()[0]}); "
                              "copy or download it again, or re-save it from an image viewer.") from None
    return image


def _too_large(what: str, name: str, detail: str) -> str:
    return (f"{what}: {name} is {detail}, above the {MAX_PIXELS / 1e6:.0f} MP that Pillow opens safely (a larger "
            "file is treated as a decompression bomb). Downscale it; a 1-2 MP photo is plenty.")


def check_dimensions(image: Image.Image, what: str, name: str = "the picture") -> None:
    """Refuse pictures no face detector can use (too small) or above Pillow's decompression-bomb limit."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageInputError(_too_large(what, name, f"{width}x{height} ({width * height / 1e6:.0f} MP)"))
    if min(width, height) < MIN_SIDE:
        needs = "faces need" if "face" in what or "photo of person" in what else "it needs"
        raise ImageInputError(f"{what}: {name} is {width}x{height}; {needs} at least {MIN_SIDE} px a side. "
                              f"Use a larger {'photo' if needs.startswith('faces') else 'picture'}.")


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


def _fit(image: Image.Image, max_side: int | None) -> Image.Image:
    """At most `max_side` a side, aspect kept: `thumbnail` reduces by whole factors first (cheap), then
    resamples with Lanczos. In place: only called on images this module made."""
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.LANCZOS, reducing_gap=3.0)
    return image


REDUCIBLE_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "CMYK")  # `reduce` handles these; others are converted first


def open_image(source: ImageLike, what: str = "image", max_side: int | None = WORKING_SIDE) -> Image.Image:
    """Any picture as upright 8-bit RGB, at most `max_side` pixels a side (None: full size). `what` names
    it in errors ("face photo", "pose image", ...).

    Accepts a path (whatever Pillow reads, plus HEIC/HEIF with pillow-heif), a PIL image, or a numpy
    array (H×W or H×W×3/4, any integer or float depth). Raises ImageInputError otherwise. A big JPEG is
    decoded at reduced scale; other files are reduced right after decoding, before any conversion.
    """
    if max_side is not None:
        (max_side,) = check_arguments(max_side=(max_side, "photo_side"))
    if isinstance(source, Image.Image):
        check_dimensions(source, what)
        return _fit(to_rgb8(source), max_side)  # to_rgb8 returns a new image: the caller's is never changed
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)) or 0 in array.shape:
            raise ImageInputError(f"{what}: an array of shape {array.shape} is not a picture (H×W or H×W×3/4).")
        array = _to_8bit(array)
        check_dimensions(Image.fromarray(array), what)
        return _fit(to_rgb8(Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array)),
                    max_side)
    if isinstance(source, (str, Path)):
        if str(source).strip() == "":
            raise ImageInputError(f"{what}: no file given; {FORMATS_HINT}.")
        image = _open_file(Path(source).expanduser(), what, max_side)
        if getattr(image, "n_frames", 1) == 1 and image.mode in REDUCIBLE_MODES:
            _fit(image, max_side)
        return _fit(to_rgb8(image), max_side)
    raise ImageInputError(f"{what}: a {type(source).__name__} is not a picture; pass a file path, PIL image or array.")
