"""Several people in one picture (smoke: random weights, CPU): one person equals the single-face path, each
person's identity stays in their region (IP attention and IdentityNet), layouts, regions, likeness per person."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from instantid_colab import cli, people, pipeline, smoke
from instantid_colab.engines.instantid import FaceRegion, FaceRegionIPAttnProcessor
from instantid_colab.people import Person, PeopleError
from instantid_colab.settings import SettingsError
from tests.latents import generate_with_latents, relative_difference
from tests.pictures import COOL, WARM, picture

SIZE = dict(width=128, height=128)


def person_photo(colour=(235, 200, 175)) -> Image.Image:
    return smoke.sample_face_image(face_color=colour)


@pytest.mark.parametrize("settings", [dict(seed=5, steps=3), dict(seed=6, steps=2, negative_noise=0.35, num_images=2),
                                      dict(seed=7, steps=2, guidance_scale=1.0)])
def test_one_person_equals_the_single_face_path(smoke_session, monkeypatch, settings):
    """The people path (each person a slot of a MultiControlNetModel, tokens and region per person) with one
    person and the face box as their region computes today's single-face latents."""
    face = person_photo()
    _, expected = generate_with_latents(smoke_session, monkeypatch, face, pose_image=face, **SIZE, **settings)
    box = Image.fromarray((pipeline.face_box_mask(_box(smoke_session, face), (128, 128)) * 255).astype(np.uint8))
    alone, latents = generate_with_latents(smoke_session, monkeypatch, people=[Person((face,), mask=box)],
                                           pose_image=face, **SIZE, **settings)
    assert relative_difference(latents, expected) < 1e-6
    assert alone.settings["people"] == [{"photos": 1, "face_box": [int(round(v)) for v in _box(smoke_session, face)]}]


def _box(session, face) -> np.ndarray:
    """The face box of `face` at the 128 px output (the photo is 256 px)."""
    return session.faces.detect(face).bbox * 128 / face.width


def test_the_comparison_sees_a_different_region(smoke_session, monkeypatch):
    face = person_photo()
    _, expected = generate_with_latents(smoke_session, monkeypatch, face, pose_image=face, seed=5, steps=3, **SIZE)
    _, latents = generate_with_latents(smoke_session, monkeypatch, people=[Person((face,))], pose_image=face, seed=5,
                                       steps=3, **SIZE)  # head and shoulders instead of the face box
    assert relative_difference(latents, expected) > 1e-3


def _ip_attention(session):
    """An attention module of the UNet with its face-region IP processor."""
    for module in session.pipe.unet.modules():
        if isinstance(getattr(module, "processor", None), FaceRegionIPAttnProcessor):
            return module, module.processor
    raise AssertionError("no IP attention")


def test_ip_attention_gives_each_region_only_its_persons_tokens(smoke_session):
    attention, processor = _ip_attention(smoke_session)
    generator = torch.Generator().manual_seed(0)
    width = attention.to_q.in_features
    hidden = torch.randn(1, 64, width, generator=generator)  # an 8x8 attention map
    text = torch.randn(1, 77, attention.to_k.in_features, generator=generator)
    cross = processor.to_k_ip[0].in_features
    person_a, person_b = torch.randn(1, 16, cross, generator=generator), torch.randn(1, 16, cross, generator=generator)
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32] = 1  # person A: the left half; person B: the right quarter; between them: nobody
    masks[1, :, 40:] = 1
    rows_a, rows_b = FaceRegion(masks).attention_rows(64, hidden.device)
    nobody = sorted(set(range(64)) - set(rows_a.tolist()) - set(rows_b.tolist()))
    assert len(rows_a) == 32 and len(rows_b) == 24 and len(nobody) == 8

    def run(a, b, scale=0.8):
        processor.region, processor.scale = FaceRegion(masks), [scale]
        try:
            with torch.no_grad():
                return processor(attention, hidden, (text, [torch.cat([a, b], dim=1)[:, None]]))[0]
        finally:
            processor.region = None

    out = run(person_a, person_b)
    other_b = run(person_a, torch.randn(1, 16, cross, generator=generator))
    other_a = run(torch.randn(1, 16, cross, generator=generator), person_b)
    text_only = run(person_a, person_b, scale=0.0)
    assert torch.equal(out[rows_a], other_b[rows_a]) and not torch.allclose(out[rows_b], other_b[rows_b])
    assert torch.equal(out[rows_b], other_a[rows_b]) and not torch.allclose(out[rows_a], other_a[rows_a])
    assert torch.allclose(out[nobody], text_only[nobody], atol=1e-6)


def test_in_a_generation_region_a_never_sees_person_bs_face(smoke_session):
    """Hooked on the first IP attention at the first step, where both runs see the same hidden states: changing
    person B's photo changes that layer's output in B's region only."""
    attention, _ = _ip_attention(smoke_session)
    outputs = []
    hook = attention.register_forward_hook(lambda module, args, output: outputs.append(output.detach().clone()))
    try:
        for colour in (COOL, (240, 180, 200)):
            pipeline.generate(smoke_session, people=[Person((person_photo(WARM),)), Person((person_photo(colour),))],
                              seed=3, steps=1, **SIZE)
    finally:
        hook.remove()
    first, second = outputs[0], outputs[len(outputs) // 2]
    queries = first.shape[1]
    boxes, _ = people.auto_layout(2, (128, 128))
    rows_a, rows_b = FaceRegion(torch.from_numpy(people.regions(boxes, (128, 128), [None, None]))).attention_rows(
        queries, first.device)
    assert torch.equal(first[:, rows_a], second[:, rows_a])
    assert not torch.allclose(first[:, rows_b], second[:, rows_b])


def test_each_persons_identitynet_sees_only_their_keypoints(smoke_session):
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault(kwargs.get("person", 0), kwargs["controlnet_cond"].detach().clone())

    hook = smoke_session.pipe.controlnet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = pipeline.generate(smoke_session, people=[Person((person_photo(WARM),)), Person((person_photo(COOL),))],
                                   seed=3, steps=1, **SIZE)
    finally:
        hook.remove()
    assert sorted(seen) == [0, 1]
    for index, person in enumerate(result.settings["people"]):
        drawn = seen[index][0].amax(dim=0).numpy() > 0  # [height, width]: where the keypoint image is not black
        rows, cols = np.nonzero(drawn)
        x1, y1, x2, y2 = person["face_box"]
        assert drawn.any() and x1 - 12 <= cols.min() and cols.max() <= x2 + 12 and y1 - 12 <= rows.min(), index


def test_two_people_from_a_layout_photo_in_the_given_order(smoke_session):
    layout = picture((640, 640), [(64, 256, 128, WARM), (448, 256, 128, COOL)])
    duo = [Person((person_photo(WARM),)), Person((person_photo(COOL),))]
    result = pipeline.generate(smoke_session, people=duo, pose_image=layout, seed=3, steps=1, **SIZE)
    boxes = [person["face_box"] for person in result.settings["people"]]
    np.testing.assert_allclose(boxes, [[13, 51, 38, 77], [90, 51, 115, 77]], atol=1)
    swapped = pipeline.generate(smoke_session, people=duo, pose_image=layout, order=[2, 1], seed=3, steps=1, **SIZE)
    assert [person["face_box"] for person in swapped.settings["people"]] == boxes[::-1]
    assert swapped.settings["order"] == [2, 1] and len(swapped.people_likeness[0]) == 2
    with pytest.raises(PeopleError, match=r"The layout photo has 1 face but 2 people were given: use a photo with "
                                          r"exactly 2 faces, or none"):
        pipeline.generate(smoke_session, people=duo, pose_image=picture((640, 640), [(256, 256, 128, WARM)]), steps=1,
                          **SIZE)


def test_regions_are_head_and_shoulders_disjoint_by_the_nearest_face():
    boxes = np.array([[40.0, 40, 60, 60], [70, 40, 90, 60]])
    masks = people.regions(boxes, (128, 96), [None, None])
    assert masks.shape == (2, 96, 128) and masks.dtype == np.float32
    assert masks.sum(axis=0).max() == 1  # no position belongs to two people
    assert masks[0, 50, 64] == 1 and masks[1, 50, 66] == 1  # the overlap is split at the middle (65)
    assert masks[0, 32, 25] == 1 and masks[0, 31, 25] == 0  # 0.4 x the side above the box, 1.25 x beside the centre
    assert masks[0, 89, 50] == 1 and masks[0, 90, 50] == 0  # 1.5 x the side below the box
    given = Image.new("L", (128, 96))
    given.paste(255, (0, 0, 30, 96))
    masks = people.regions(boxes, (128, 96), [given, None])
    assert masks[0].sum() == 30 * 96 and masks[0, :, 30:].sum() == 0


def test_side_by_side_layout_puts_faces_in_equal_slots():
    boxes, kps = people.auto_layout(3, (1152, 896))
    sides = boxes[:, 2] - boxes[:, 0]
    assert np.allclose(sides, sides[0]) and np.allclose((boxes[:, 0] + boxes[:, 2]) / 2, [192, 576, 960])
    assert np.allclose((boxes[:, 1] + boxes[:, 3]) / 2, 0.35 * 896)
    inside = (kps[..., 0] > boxes[:, None, 0]) & (kps[..., 0] < boxes[:, None, 2])
    assert inside.all() and kps.shape == (3, 5, 2)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: people.check_people([Person(("a",))] * 5), r"people 5 is out of range: use 1 to 4"),
    (lambda: people.check_people([Person(("a",)), Person(())]), r"person 2 has no photo"),
    (lambda: people.parse_order("1,1", 2), r"order '1,1' must list the people 1 to 2 once each, e.g. 2,1"),
    (lambda: people.parse_order("2,x", 2), r"order '2,x' must list the people"),
    (lambda: pipeline.generate(None, person_photo(), people=[Person(("a",))]), r"give a face photo, or people"),
])
def test_wrong_people_are_refused_before_any_model_runs(call, message):
    with pytest.raises(SettingsError, match=message):
        call()


def test_cli_two_people_smoke_run_records_both(tmp_path, capsys):
    """The issue's command: `generate --smoke --person A.png --person B.png --out two.png`."""
    person_photo(WARM).save(tmp_path / "A.png")
    person_photo(COOL).save(tmp_path / "B+2.png")  # a '+' in a file name that exists is part of the name
    assert cli.main(["generate", "--smoke", "--person", str(tmp_path / "A.png"), "--person", str(tmp_path / "B+2.png"),
                     "--steps", "1", "--seed", "4", "--out", str(tmp_path / "two.png")]) == 0
    metadata = json.loads(Image.open(tmp_path / "two.png").text["instantid"])
    assert [person["photos"] for person in metadata["people"]] == [1, 1]
    assert all(len(person["face_box"]) == 4 and "identity_similarity" in person for person in metadata["people"])
    assert all((person["identity_similarity"] is None) == (person["identity_similarity_note"] is not None)
               for person in metadata["people"])
    printed = capsys.readouterr().out
    assert "person 1 (1 photo, face box [" in printed and "person 2 (1 photo, face box [" in printed
