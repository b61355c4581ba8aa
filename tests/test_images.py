"""images.open_image: every picture a user may hand in, as upright 8-bit RGB with the right pixel values,
or one message naming the file and what to do."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from instantid_colab import images
from instantid_colab.images import ImageInputError, open_image
from tests.pictures import png_header_only

SIZE = (96, 80)


def _pixel(image: Image.Image, xy=(10, 10)) -> tuple:
    assert image.mode == "RGB"
    return image.getpixel(xy)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    """Pillow's convert("RGB") clips 16-bit grey to white: a clear face became a white page."""
    values = np.full(SIZE[::-1], 32896, np.uint16)  # 32896 / 257 = 128
    values[:, :10] = 65535
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")  # Pillow < 10 opens 16-bit grey as "I"
    image = open_image(path)
    assert _pixel(image, (50, 10)) == (128, 128, 128) and _pixel(image, (0, 0)) == (255, 255, 255)


def test_16_bit_rgb_png_keeps_its_colours(tmp_path):
    import cv2

    rgb16 = np.zeros((SIZE[1], SIZE[0], 3), np.uint16)
    rgb16[...] = (51400, 25700, 12850)  # 200, 100, 50 in 8 bits
    path = tmp_path / "rgb16.png"
    cv2.imwrite(str(path), rgb16[:, :, ::-1])
    assert _pixel(open_image(path)) == (200, 100, 50)


def test_float_and_wide_integer_arrays(tmp_path):
    assert _pixel(open_image(np.full((80, 96), 0.5, np.float32))) == (128, 128, 128)  # 0-1 floats
    assert _pixel(open_image(np.full((80, 96, 3), 1000, np.uint16))) == (4, 4, 4)  # 16-bit samples
    rgba = np.full((80, 96, 4), 200, np.uint8)
    rgba[..., 3] = 255
    assert _pixel(open_image(rgba)) == (200, 200, 200)  # opaque RGBA
    path = tmp_path / "float.tiff"
    Image.fromarray(np.full((80, 96), 0.25, np.float32), mode="F").save(path)
    assert _pixel(open_image(path)) == (64, 64, 64)


def test_transparency_lands_on_white(tmp_path):
    rgba = Image.new("RGBA", SIZE, (255, 0, 0, 0))
    rgba.putpixel((10, 10), (255, 0, 0, 255))
    la = Image.new("LA", SIZE, (40, 128))
    palette = Image.new("P", SIZE, 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 1
    for image, name in ((rgba, "rgba.png"), (la, "la.png"), (palette, "palette.png")):
        image.save(tmp_path / name)
    assert _pixel(open_image(tmp_path / "rgba.png")) == (255, 0, 0)
    assert _pixel(open_image(tmp_path / "rgba.png"), (0, 0)) == (255, 255, 255)
    assert _pixel(open_image(tmp_path / "la.png")) == (147, 147, 147)  # 40 over white at alpha 128/255
    assert _pixel(open_image(tmp_path / "palette.png")) == (255, 255, 255)


def test_cmyk_uses_its_icc_profile_and_plain_cmyk_the_formula(tmp_path):
    cmyk = Image.new("CMYK", SIZE, (0, 255, 255, 0))  # pure red ink
    plain = tmp_path / "plain.jpg"
    cmyk.save(plain, quality=100)
    red = _pixel(open_image(plain))
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    with_profile = cmyk.copy()
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    with_profile.info["icc_profile"] = profile  # not a CMYK profile: falls back to the formula
    assert _pixel(open_image(with_profile)) == _pixel(cmyk.convert("RGB"))


def test_exif_orientation_and_first_animation_frame(tmp_path):
    stored = Image.new("RGB", (160, 80), (0, 0, 255))
    stored.putpixel((0, 0), (255, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    upright = open_image(tmp_path / "phone.jpg")
    assert upright.size == (80, 160)

    frames = [Image.new("RGB", SIZE, colour) for colour in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    assert _pixel(open_image(tmp_path / "anim.gif"))[0] > 240  # the red first frame, not the green second


def test_heic_photos_open_through_pillow_heif(tmp_path):
    pytest.importorskip("pillow_heif")
    path = tmp_path / "phone.heic"
    images._register_heif()
    Image.new("RGB", SIZE, (200, 100, 50)).save(path, quality=95)
    assert open(path, "rb").read(12)[4:12] == b"ftypheic"
    r, g, b = _pixel(open_image(path))
    assert abs(r - 200) <= 3 and abs(g - 100) <= 3 and abs(b - 50) <= 3


def test_heic_without_pillow_heif_says_how_to_get_it(tmp_path, monkeypatch):
    path = tmp_path / "phone.heic"
    path.write_bytes(b"\x00\x00\x00\x1cftypheic\x00\x00\x00\x00" + b"\x00" * 64)
    monkeypatch.setattr(images, "_register_heif", lambda: False)
    with pytest.raises(ImageInputError, match=r"is a HEIC/HEIF photo and pillow-heif is not installed: run "
                                              r"`python -m instantid_colab install`"):
        open_image(path, "face photo")


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.mkdir(), r"^face photo: .*/x is a folder, not a picture\. Point to one photo file in it\.$"),
    (lambda p: p.write_bytes(b""), r"^face photo: .*/x is empty \(0 bytes\)"),
    (lambda p: p.write_text("hello, not a photo"), r"^face photo: .*/x is not a picture \(18 bytes that no image reader "
                                                   r"recognises\); use a JPG, PNG, WebP or HEIC photo\.$"),
    (lambda p: None, r"^face photo: .*/x does not exist\. Check the path"),
    (lambda p: p.write_bytes(_jpeg()[:700]), r"^face photo: .*/x is damaged or cut off \(image file is truncated"),
    (lambda p: png_header_only(p, 20000, 15000), r"is 300 MP, above the 256 MP that Pillow opens safely"),
    (lambda p: Image.new("RGB", (63, 500)).save(p, format="PNG"), r"is 63x500; faces need at least 64 px a side"),
])
def test_unusable_files_get_one_message_naming_them(tmp_path, make, message):
    path = tmp_path / "x"
    make(path)
    with pytest.raises(ImageInputError, match=message):
        open_image(path, "face photo")


@pytest.mark.parametrize(("source", "message"), [
    ("", r"^face photo: no file given"),
    (np.zeros((4, 4, 7)), r"an array of shape \(4, 4, 7\) is not a picture"),
    (np.zeros((0, 5)), r"an array of shape \(0, 5\) is not a picture"),
    (12, r"a int is not a picture"),
])
def test_other_sources_that_are_not_pictures(source, message):
    with pytest.raises(ImageInputError, match=message):
        open_image(source, "face photo")


def _jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_an_81_mp_photo_is_accepted_and_decoded_to_the_working_size(tmp_path):
    """It was refused ("the limit is 40 MP"); phones take 48 and 200 MP photos."""
    path = tmp_path / "big.png"
    Image.new("1", (9000, 6000), 1).save(path)
    image = open_image(path, "face photo")
    assert image.size == (2048, 1365) and image.mode == "RGB" and _pixel(image) == (255, 255, 255)
    assert open_image(path, "face photo", max_side=None).size == (9000, 6000)


PEAK_RSS = """
import json, re, sys
from pathlib import Path
from instantid_colab.images import open_image

def peak_mib():  # VmHWM: this process's own peak (ru_maxrss would start from the parent's RSS after exec)
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text())[1]) // 1024

open_image(sys.argv[2])  # the lazy imports of a first open are not counted
before = peak_mib()
image = open_image(sys.argv[1])
print(json.dumps([image.size, image.getpixel((1000, 750)), peak_mib() - before]))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from Linux's /proc")
def test_a_big_jpeg_is_decoded_at_reduced_scale_not_in_full(tmp_path):
    """A 48 MP JPEG (8000x6000) fully decoded is 144 MB of RGB (about 550 MiB at the peak with the conversions,
    benchmarks/bench_large_photo.py); at libjpeg's 1/4 scale, 2000x1500, about 35 MiB."""
    import json
    import subprocess
    import sys

    photo = Image.new("RGB", (8000, 6000), (40, 60, 80))
    photo.paste((230, 200, 170), (3000, 2000, 5000, 4000))
    photo.save(tmp_path / "phone.jpg", quality=90)
    Image.new("RGB", (256, 256)).save(tmp_path / "small.jpg")
    del photo
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp_path / "phone.jpg"), str(tmp_path / "small.jpg")],
                          capture_output=True, text=True, check=True)
    size, pixel, grown_mib = json.loads(done.stdout)
    assert size == [2000, 1500] and all(abs(a - b) <= 3 for a, b in zip(pixel, (230, 200, 170)))
    assert grown_mib < 100, f"peak RSS grew {grown_mib} MiB: the JPEG was decoded at full size"


def test_a_pil_image_handed_in_is_never_changed():
    original = Image.new("RGB", (4000, 3000), (1, 2, 3))
    image = open_image(original)
    assert image.size == (2048, 1536) and original.size == (4000, 3000)
