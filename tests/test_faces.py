"""faces.py through insightface's real model router and decoding, on tiny ONNX fixtures (smoke: random weights)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from instantid_colab.faces import FaceAnalyzer, NoFaceError, combine_embeddings, draw_kps
from instantid_colab.images import open_image
from instantid_colab.smoke.faces import KPS_OFFSETS, write_smoke_face_models
from tests.pictures import COOL, WARM, picture



def expected_kps(center, stride):
    return np.asarray(center) + np.asarray(KPS_OFFSETS) * stride


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    write_smoke_face_models(root)
    return FaceAnalyzer(root, device="cpu")


def test_real_router_picks_scrfd_with_keypoints_and_arcface(analyzer):
    models = analyzer._app.models
    assert set(models) == {"detection", "recognition"}
    assert type(models["detection"]).__name__ == "SCRFD" and models["detection"].use_kps
    assert type(models["recognition"]).__name__ == "ArcFaceONNX"
    assert analyzer.providers == ["CPUExecutionProvider"]


def test_detect_all_finds_every_face_left_to_right(analyzer):
    image = picture((640, 640), [(448, 256, 128, COOL), (64, 256, 128, WARM)])
    found = analyzer.detect_all(image)
    np.testing.assert_allclose([face.bbox for face in found], [[64, 256, 192, 384], [448, 256, 576, 384]], atol=1)
    assert np.linalg.norm(found[0].embedding - analyzer.detect(picture((640, 640), [(64, 256, 128, WARM)])).embedding) < 1e-3
    assert analyzer.detect_all(picture((640, 640), [])) == []


def test_largest_face_wins(analyzer):
    image = picture((640, 640), [(448, 64, 64, WARM), (256, 256, 128, COOL)])
    face = analyzer.detect(image)
    np.testing.assert_allclose(face.bbox, [256, 256, 384, 384], atol=1)
    np.testing.assert_allclose(face.kps, expected_kps((320, 320), 16), atol=1)
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    assert face.det_score > 0.9


@pytest.mark.parametrize("background", [(0, 0, 0), (255, 255, 255)])
def test_no_face_raises_with_advice(analyzer, background):
    with pytest.raises(NoFaceError) as error:
        analyzer.detect(picture((400, 300), [], background))
    assert "tried detection sizes 640/480/320/256 and a padded copy" in str(error.value)
    assert "less tight crop" in str(error.value)


def test_padding_retry_finds_a_face_cut_by_the_border(analyzer):
    tight = picture((320, 320), [(0, 0, 128, WARM)])  # touches the top and left edges
    assert analyzer._find(np.asarray(tight)[:, :, ::-1].copy(), analyzer._det_sizes()) is None
    face = analyzer.detect(tight)  # found on the copy padded by 160 px per side, then shifted back
    np.testing.assert_allclose(face.bbox, [0, 0, 128, 128], atol=1)


def test_rgba_grayscale_and_exif_rotated_give_the_same_keypoints(analyzer):
    plain = picture((640, 480), [(128, 64, 128, WARM)])
    reference = analyzer.detect(plain).kps
    np.testing.assert_allclose(reference, expected_kps((192, 128), 16), atol=1)

    rgba = plain.convert("RGBA")
    rgba.putpixel((639, 479), (0, 0, 0, 0))
    grayscale = plain.convert("L")
    stored = plain.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    buffer.seek(0)
    rotated = Image.open(buffer)
    assert rotated.size == (480, 640) and open_image(rotated).size == (640, 480)

    for variant in (rgba, grayscale, rotated):
        np.testing.assert_allclose(analyzer.detect(variant).kps, reference, atol=1)


def test_very_large_image_is_detected_on_a_copy_and_mapped_back(analyzer):
    huge = picture((5120, 5120), [(2048, 2048, 1024, WARM)])
    face = analyzer.detect(huge)
    np.testing.assert_allclose(face.bbox, [2048, 2048, 3072, 3072], atol=8)
    np.testing.assert_allclose(face.kps, expected_kps((2560, 2560), 128), atol=8)


def test_embeddings_follow_the_face(analyzer):
    warm = picture((640, 640), [(256, 256, 128, WARM)])
    cool = picture((640, 640), [(256, 256, 128, COOL)])
    warm_elsewhere = picture((640, 640), [(64, 64, 128, WARM)])
    a, b, c = (analyzer.detect(image).embedding for image in (warm, cool, warm_elsewhere))
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)
    assert np.linalg.norm(a - b) > 0.1 * np.linalg.norm(a)

    combined, first = analyzer.embed([warm, cool], combine="concat")
    assert combined.shape == (2, 512)
    np.testing.assert_allclose(combined, np.stack([a, b]), rtol=1e-5)
    np.testing.assert_allclose(first.bbox, [256, 256, 384, 384], atol=1)
    single, _ = analyzer.embed(warm)
    assert single.shape == (1, 512)


def test_combine_embeddings_values():
    first, second = np.zeros(512, np.float32), np.zeros(512, np.float32)
    first[:2] = (3, 4)  # length 5
    second[0] = 10  # length 10
    average = combine_embeddings([first, second], "average")
    assert average.shape == (1, 512)
    np.testing.assert_allclose(average[0, :2], [6.5, 2.0])
    norm_average = combine_embeddings([first, second], "norm_average")
    direction = np.array([0.8, 0.4]) / np.linalg.norm([0.8, 0.4])  # mean of (0.6, 0.8) and (1, 0)
    np.testing.assert_allclose(norm_average[0, :2], direction * 7.5, rtol=1e-5)
    np.testing.assert_allclose(combine_embeddings([first, second], "concat"), np.stack([first, second]))
    with pytest.raises(ValueError, match="average, norm_average, concat"):
        combine_embeddings([first], "median")


def test_draw_kps_pixels():
    kps = np.array([[40, 30], [160, 30], [100, 50], [60, 80], [140, 80]], float)
    image = np.asarray(draw_kps((200, 100), kps))
    assert image.shape == (100, 200, 3)
    for (x, y), colour in zip(kps.astype(int), [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]):
        assert tuple(image[y, x]) == colour
        assert tuple(image[y, x + 9]) == colour and tuple(image[y + 12, x + 12]) != colour  # radius 10
    assert tuple(image[40, 70]) == (153, 0, 0)  # limb 0-2 midpoint, red ×0.6
    assert tuple(image[40, 130]) == (0, 153, 0)  # limb 1-2 midpoint, green ×0.6
    assert tuple(image[0, 0]) == (0, 0, 0) and tuple(image[99, 199]) == (0, 0, 0)


def test_missing_models_say_where_to_put_them(tmp_path):
    unzipped = write_smoke_face_models(tmp_path / "download")
    shutil.copytree(unzipped, tmp_path / "models" / "antelopev2" / "antelopev2")  # a zip unpacked one level too deep
    with pytest.raises(FileNotFoundError, match="one level too deep"):
        FaceAnalyzer(tmp_path)
