"""The refine pass and face swap (smoke: random weights, CPU): only the feathered face region changes, each face
gets its own identity, faces that fill the picture are left alone, a photo's EXIF orientation is kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from instantid_colab import cli, pipeline, refine, smoke
from instantid_colab.faces import NoFaceError
from instantid_colab.people import Person
from instantid_colab.settings import SettingsError
from tests.pictures import COOL, WARM, picture

QUICK = dict(steps=3, seed=5)


def outside_changed(before: Image.Image, after: Image.Image, box, side: float) -> int:
    """Pixels that differ outside the face box grown by the repainted margin and 3x the feather."""
    reach = side * (refine.MASK_GROW + 3 * refine.FEATHER) + 2
    x1, y1, x2, y2 = box
    changed = np.any(np.asarray(before, np.int16) != np.asarray(after, np.int16), axis=2)
    changed[max(0, int(y1 - reach)):int(y2 + reach) + 1, max(0, int(x1 - reach)):int(x2 + reach) + 1] = False
    return int(changed.sum())


@pytest.fixture(scope="module")
def target():
    """A 1200x800 photo with one smoke face (the smoke detector's bright square, a fifth of the long side)."""
    return picture((1200, 800), [(600, 280, 240, COOL)])


def test_swap_changes_the_face_region_only_and_records_where(smoke_session, target):
    result = refine.swap(smoke_session, target, smoke.sample_face_image(), **QUICK)
    x1, y1, x2, y2 = result.face_box
    assert result.image.size == target.size and abs(x2 - x1 - 240) < 8
    assert outside_changed(target, result.image, result.face_box, x2 - x1) == 0
    inside = np.asarray(result.image)[y1:y2, x1:x2] != np.asarray(target)[y1:y2, x1:x2]
    assert inside.mean() > 0.5  # the face itself was made again
    metadata = json.loads(result.image.info["instantid"])
    assert metadata["swap"]["face_box"] == result.face_box and metadata["swap"]["strength"] == 0.7
    assert (metadata["width"], metadata["height"]) == (1200, 800) and metadata["label"] == smoke.SMOKE_LABEL
    assert "inpaint" in smoke_session._views  # diffusers' SDXL ControlNet inpaint pipeline did the repainting


def test_swap_picks_the_face_asked_for_and_keeps_the_others(smoke_session):
    group = picture((1600, 640), [(120, 200, 320, WARM), (880, 200, 320, COOL)])
    result = refine.swap(smoke_session, group, smoke.sample_face_image(), which=2, **QUICK)
    assert result.face_box[0] > 800
    assert np.array_equal(np.asarray(result.image)[:, :600], np.asarray(group)[:, :600])  # face 1 untouched
    with pytest.raises(NoFaceError, match=r"The target photo has 2 faces; --which 3 asks for face 3 from the left"):
        refine.swap(smoke_session, group, smoke.sample_face_image(), which=3, **QUICK)


def test_swap_keeps_a_rotated_phone_photo_upright(smoke_session, target, tmp_path):
    """A phone's portrait photo: stored sideways with EXIF orientation 6; the output is the upright picture."""
    sideways = target.transpose(Image.ROTATE_90)  # stored rotated; orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    sideways.save(path, exif=exif.tobytes(), quality=100)
    upright = np.asarray(Image.open(path).transpose(Image.ROTATE_270))
    result = refine.swap(smoke_session, path, smoke.sample_face_image(), **QUICK)
    assert result.image.size == (1200, 800)
    side = result.face_box[2] - result.face_box[0]
    assert outside_changed(Image.fromarray(upright), result.image, result.face_box, side) == 0


def test_swap_says_when_a_photo_has_no_face(smoke_session, target):
    grey = Image.new("RGB", (640, 480), (128, 128, 128))
    with pytest.raises(NoFaceError, match="No face found in the target photo"):
        refine.swap(smoke_session, grey, smoke.sample_face_image(), **QUICK)
    with pytest.raises(NoFaceError, match=r"^No face found \(tried detection sizes"):
        refine.swap(smoke_session, target, grey, **QUICK)


def test_refine_remakes_the_face_with_its_identity_and_records_before_and_after(smoke_session, monkeypatch):
    face = smoke.sample_face_image()
    result = pipeline.generate(smoke_session, face, width=512, height=512, **QUICK)
    made = picture((512, 512), [(200, 160, 102, WARM)])  # a picture whose face the smoke detector finds
    result.images[0] = made.copy()
    result.likeness[0] = smoke_session.faces.likeness(result.cast.embeddings[0], made)
    calls = []
    generate = pipeline.generate
    monkeypatch.setattr(pipeline, "generate", lambda *a, **k: calls.append(k) or generate(*a, **k))
    refine.refine_faces(smoke_session, result, 0.5, face_image=face)
    assert len(calls) == 1 and calls[0]["face_image"] is face and calls[0]["init_strength"] == 0.5
    assert calls[0]["width"] == calls[0]["height"] == refine.CROP_SIZE and calls[0]["init_mask"] is not None
    refined = json.loads(result.images[0].info["instantid"])["refine_face"]
    assert (refined["strength"], refined["faces"], refined["left_alone"]) == (0.5, 1, [])
    assert refined["identity_similarity_before"] is not None
    assert outside_changed(made, result.images[0], (200, 160, 302, 262), 102) == 0
    assert not np.array_equal(np.asarray(made), np.asarray(result.images[0]))


def test_a_face_that_fills_the_picture_is_left_alone(smoke_session):
    face = smoke.sample_face_image()
    result = pipeline.generate(smoke_session, face, width=256, height=256, **QUICK)
    result.images[0] = picture((1280, 1280), [(384, 384, 512, WARM)])  # a 512 px face: a 1076 px crop, x0.95
    refine.refine_faces(smoke_session, result, face_image=face)
    assert result.refined[0]["faces"] == 0 and result.refined[0]["left_alone"] == [1]
    assert f"image 1: the face {refine.TOO_BIG}" in result.notices


def test_refine_gives_each_person_their_own_photos(smoke_session, monkeypatch):
    duo = [Person((smoke.sample_face_image(face_color=WARM),)), Person((smoke.sample_face_image(face_color=COOL),))]
    layout = picture((640, 640), [(64, 256, 128, WARM), (448, 256, 128, COOL)])
    result = pipeline.generate(smoke_session, people=duo, pose_image=layout, width=640, height=640, **QUICK)
    result.images[0] = layout.copy()  # both faces where the regions are
    calls = []
    generate = pipeline.generate
    monkeypatch.setattr(pipeline, "generate", lambda *a, **k: calls.append(k) or generate(*a, **k))
    refine.refine_faces(smoke_session, result, people=duo)
    assert [call["face_image"] for call in calls] == [duo[0].photos[0], duo[1].photos[0]]
    metadata = json.loads(result.images[0].info["instantid"])
    assert metadata["refine_face"]["faces"] == 2 and len(metadata["refine_face"]["identity_similarity_before"]) == 2
    assert len(metadata["people"]) == 2


def test_repainting_needs_a_start_photo_for_its_mask(smoke_session):
    with pytest.raises(SettingsError, match="init_mask needs init_image"):
        pipeline.generate(smoke_session, smoke.sample_face_image(), init_mask=Image.new("L", (64, 64), 255))


def test_cli_swap_and_refine_in_smoke_mode(tmp_path, target, capsys):
    """The issue's commands: `swap --smoke --photo T.png --face F.png --out s.png`, `generate --smoke --refine-face`."""
    target.save(tmp_path / "T.png")
    smoke.sample_face_image().save(tmp_path / "F.png")
    assert cli.main(["swap", "--smoke", "--photo", str(tmp_path / "T.png"), "--face", str(tmp_path / "F.png"),
                     "--steps", "3", "--out", str(tmp_path / "s.png")]) == 0
    swapped = Image.open(tmp_path / "s.png")
    box = json.loads(swapped.text["instantid"])["swap"]["face_box"]
    assert outside_changed(target, swapped.convert("RGB"), box, box[2] - box[0]) == 0
    assert "swapped the face at [" in capsys.readouterr().out
    assert cli.main(["generate", "--smoke", "--refine-face", "--steps", "3", "--seed", "2",
                     "--out", str(tmp_path / "r.png")]) == 0
    refined = json.loads(Image.open(tmp_path / "r.png").text["instantid"])["refine_face"]
    assert refined["strength"] == 0.4 and refined["faces"] in (0, 1)
    assert "image 1: refined" in capsys.readouterr().out


def test_the_img2img_and_inpaint_views_share_the_models_in_their_dtypes(weights_for_views):
    """diffusers' `from_pipe` cast every shared module to float32: a T4's fp16 UNet doubled and ran out of memory."""
    import torch

    session = weights_for_views
    session.pipe.unet.to(torch.float16)  # as on a GPU; the views must leave it so
    for name in ("img2img", "inpaint"):
        view = session.view(name)
        assert view.unet is session.pipe.unet and view.controlnet is session.pipe.controlnet and view.vae is session.pipe.vae
    assert next(session.pipe.unet.parameters()).dtype == torch.float16
    assert next(session.pipe.text_encoder.parameters()).dtype == torch.float32


@pytest.fixture
def weights_for_views(tmp_path):
    from instantid_colab import memory

    return pipeline.load_pipeline(smoke.build_smoke_weights(tmp_path), memory.choose_plan(16, None), progress=False)


def test_the_refine_pass_repaints_with_the_images_speed_mode_lora_sampler_and_guidance_interval(smoke_session,
                                                                                                 monkeypatch):
    """hyper-8 keeps classifier-free guidance: its LoRA must be active in every UNet call of the refine pass, and
    the interval must drop the unconditional half outside it, as in the image itself."""
    from instantid_colab.loras import SPEED_PREFIX

    face = smoke.sample_face_image()
    result = pipeline.generate(smoke_session, face, width=128, height=128, speed="hyper-8",
                               guidance_interval=(0.25, 0.75), seed=5)
    made = picture((512, 512), [(200, 160, 102, WARM)])
    result.images[0] = made.copy()
    unet = smoke_session.pipe.unet
    forward, calls = unet.forward, []

    def recorded(sample, *args, **kwargs):
        calls.append((sample.shape[0], sorted(smoke_session.loras.active)))
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", recorded)
    refine.refine_faces(smoke_session, result, 0.5, face_image=face)
    assert [batch for batch, _ in calls] == [1, 2, 2, 1]  # 4 of hyper-8's 8 steps at 0.5; guided on steps 1 and 2
    assert all(any(name.startswith(SPEED_PREFIX) for name in active) for _, active in calls)
    used = json.loads(result.images[0].info["instantid"])["refine_face"]["used"]
    assert used["speed"]["name"] == "hyper-8" and used["speed"]["lora"] == "ByteDance/Hyper-SD/Hyper-SDXL-8steps-CFG-lora.safetensors"
    assert (used["scheduler"], used["steps"], used["guidance_scale"]) == ("DDIM trailing", 8, 5.0)
    assert used["guidance_interval"] == [0.25, 0.75] and used["unconditional_steps"] == 2
