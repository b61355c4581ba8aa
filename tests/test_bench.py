"""The identity benchmark (`bench`): people and the held-out rule, prompts, the grid and its refusals, each metric
against a hand computation on the tiny smoke judges, the summary's statistics, and the command end to end."""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image
from scipy.stats import t as student_t

from instantid_colab import batch, cli, smoke
from instantid_colab.bench import grid, judges, prompts, references, report, run
from instantid_colab.settings import SettingsError
from instantid_colab.weights import model_folder

BLUE = (150, 210, 240)
# OpenCV's FaceRecognizerSF aligns the five points onto this 112x112 template (face_recognize.cpp).
SFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                           [70.7299, 92.2041]])
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture
def people_folder(tmp_path: Path) -> Path:
    """ann.png (one photo); bob/ with three photos (the last held out); an empty-named file and a note ignored."""
    folder = tmp_path / "faces"
    (folder / "bob").mkdir(parents=True)
    smoke.sample_face_image().save(folder / "ann.png")
    for index, size in enumerate((256, 288, 320), 1):
        smoke.sample_face_image(size, face_color=BLUE).save(folder / "bob" / f"bob-{index}.png")
    (folder / "notes.txt").write_text("not a photo")
    (folder / ".DS_Store").write_bytes(b"\0")
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return smoke.build_smoke_weights(tmp_path_factory.mktemp("smoke"))


@pytest.fixture(scope="module")
def session(weights):
    from instantid_colab import pipeline

    return pipeline.load_pipeline(weights, progress=False)


@pytest.fixture(scope="module")
def loaded_judges(weights):
    return judges.load_judges(weights, "cpu", on_gpu=False)


# ---------------------------------------------------------------------------------------------
# People and the held-out rule


def test_one_photo_per_person_or_a_folder_per_person_and_the_last_photo_is_held_out(people_folder):
    ann, bob = references.find_people(people_folder)
    assert (ann.name, [p.name for p in ann.references], ann.held_out) == ("ann", ["ann.png"], None)
    assert (bob.name, [p.name for p in bob.references], bob.held_out.name) == ("bob", ["bob-1.png", "bob-2.png"],
                                                                               "bob-3.png")
    assert bob.describe() == "bob: given bob-1.png, bob-2.png; held out: bob-3.png"


def test_the_held_out_photo_is_never_given_to_the_generator(people_folder):
    plan = run.plan(people_folder, "protocol", "speed=quality,lightning-4", seeds=2, smoke=True)
    held_out = Image.open(people_folder / "bob" / "bob-3.png").convert("RGB")
    given = {batch.controls.image_digest(image) for row in plan.rows
             for image in (row.values["face_image"], *row.values["extra_face_images"])}
    assert batch.controls.image_digest(held_out) not in given
    bobs = [row for row in plan.rows if row.record["person"] == "bob"]
    assert {len(row.values["extra_face_images"]) for row in bobs} == {1}  # bob-1 as the face, bob-2 as the extra
    assert plan.held_out() == ["bob: bob-3.png"]
    assert "person bob: given bob-1.png, bob-2.png; held out: bob-3.png" in plan.describe()


def test_people_folders_that_cannot_be_used_are_refused_naming_them(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        references.find_people(tmp_path / "missing")
    smoke.sample_face_image().save(tmp_path / "one.png")
    with pytest.raises(ValueError, match="one.png: is a file, not a folder; give a folder with one photo per person"):
        references.find_people(tmp_path / "one.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no photos"):
        references.find_people(tmp_path / "empty")
    (tmp_path / "some" / "carl").mkdir(parents=True)
    smoke.sample_face_image().save(tmp_path / "some" / "ann.png")
    with pytest.raises(ValueError, match="these person folders hold no photo .*: carl; add photos"):
        references.find_people(tmp_path / "some")
    (tmp_path / "twice" / "ann").mkdir(parents=True)
    smoke.sample_face_image().save(tmp_path / "twice" / "ann.png")
    smoke.sample_face_image().save(tmp_path / "twice" / "ann" / "a.png")
    with pytest.raises(ValueError, match=r"'ann', 'ann' would share one file name \(ann\): a photo and a folder"):
        references.find_people(tmp_path / "twice")


# ---------------------------------------------------------------------------------------------
# Prompts


def test_the_built_in_prompts_start_with_pulids_protocol_prompt_and_each_has_a_source():
    assert prompts.BUILT_IN[0].text == "portrait, color, cinematic, in garden, soft light, detailed face"
    assert len(prompts.BUILT_IN) >= 21 and len({p.text for p in prompts.BUILT_IN}) == len(prompts.BUILT_IN)
    assert all(p.source for p in prompts.BUILT_IN)
    assert prompts.load_prompts("protocol") == (prompts.PROTOCOL,)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "cp1252"])
def test_a_prompt_file_is_read_in_the_encodings_editors_write(tmp_path, encoding):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\nportrait of a person in a café\n\n  a person skiing  \n", encoding=encoding)
    assert [p.text for p in prompts.load_prompts(str(path))] == ["portrait of a person in a café", "a person skiing"]


def test_prompt_files_that_cannot_be_used_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no such file; give a text file .* or one of: builtin, protocol"):
        prompts.load_prompts(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        prompts.load_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "twice.txt").write_text("a photo\n# a comment\nanother photo\n a photo \n")
    with pytest.raises(ValueError, match=r"twice.txt: line 4 repeats line 1; give each prompt once \(--seeds"):
        prompts.load_prompts(str(tmp_path / "twice.txt"))  # its images would be counted and never made
    (tmp_path / "binary.txt").write_bytes(b"\x00\x81\x8d")
    with pytest.raises(ValueError, match="not text in UTF-8, UTF-16 or Windows-1252"):
        prompts.load_prompts(str(tmp_path / "binary.txt"))


# ---------------------------------------------------------------------------------------------
# The grid


def test_a_grid_is_every_combination_with_none_as_the_default_and_pairs_written_with_a_colon():
    found = grid.parse_grid("speed=quality,lightning-4; guidance-interval=none,0.17:0.9")
    assert [(c.name, c.values) for c in found] == [
        ("speed=quality, guidance_interval=none", {"speed": "quality"}),
        ("speed=quality, guidance_interval=0.17:0.9", {"speed": "quality", "guidance_interval": "0.17,0.9"}),
        ("speed=lightning-4, guidance_interval=none", {"speed": "lightning-4"}),
        ("speed=lightning-4, guidance_interval=0.17:0.9", {"speed": "lightning-4", "guidance_interval": "0.17,0.9"}),
    ]
    assert grid.parse_grid(None) == [grid.Configuration("defaults")]


def test_the_issues_example_grid_plans_with_each_setting_as_a_manifest_means_it(people_folder):
    spec = "speed=quality,lightning-4,dmd2-4; identitynet_strength=0.6,0.8; guidance_interval=none,0.17:0.9"
    plan = run.plan(people_folder, "protocol", spec, smoke=True)
    # lightning-4 and dmd2-4 run no guidance: their guidance interval changes nothing, so those 4 are left out, said
    assert len(plan.configurations) == 8 and len(plan.rows) == 16 and len(plan.notices) == 4
    assert ("grid settings 'speed=lightning-4, identitynet_strength=0.6, guidance_interval=none' and 'speed=lightning-4, "
            "identitynet_strength=0.6, guidance_interval=0.17:0.9' make the same pictures (guidance_interval: guidance "
            "0.0 runs no classifier-free guidance to limit): 'speed=lightning-4, identitynet_strength=0.6, "
            "guidance_interval=0.17:0.9' is left out") in plan.describe()
    guided = next(row for row in plan.rows if row.record["configuration"] ==
                  "speed=quality, identitynet_strength=0.6, guidance_interval=0.17:0.9")
    assert (guided.values["guidance_interval"], guided.values["identitynet_strength"]) == ((0.17, 0.9), 0.6)


@pytest.mark.parametrize(("spec", "message"), [
    ("sped=quality", "grid: 'sped' is not a setting the grid can vary; use: "),
    ("seed=1,2", "grid: 'seed' is not a setting the grid can vary"),
    ("speed", "grid: 'speed' is not NAME=VALUE,VALUE,..."),
    ("speed=quality,,lcm", "grid: speed has an empty value"),
    ("speed=lcm,lcm", "grid: speed lists a value twice"),
    ("speed=lcm; speed=tcd", "grid: speed given twice"),
])
def test_grid_text_that_is_not_a_grid_is_refused(spec, message):
    with pytest.raises(SettingsError) as refused:
        grid.parse_grid(spec)
    assert str(refused.value).startswith(message)


def test_every_grid_value_is_checked_like_a_manifest_value_before_anything_loads(people_folder):
    with pytest.raises(SettingsError) as refused:
        run.plan(people_folder, "protocol", "speed=quality,fastest; steps=none,0", smoke=True)
    assert refused.value.problems == [
        "grid setting 'speed=quality, steps=0': steps 0 is out of range: use 1 to 100 (the official demo goes up to "
        "100; fast mode (LCM) uses 4-10)",
        "grid setting 'speed=fastest, steps=none': speed 'fastest' is not one of: quality, lcm, lightning-4, "
        "lightning-8, hyper-8, dmd2-4, tcd",
        "grid setting 'speed=fastest, steps=0': speed 'fastest' is not one of: quality, lcm, lightning-4, "
        "lightning-8, hyper-8, dmd2-4, tcd",
    ]


def test_a_grid_file_names_its_configurations_and_refuses_what_cannot_vary(tmp_path):
    path = tmp_path / "grid.csv"
    path.write_text("name,speed,identitynet_strength\nfast,lightning-4,0.6\nofficial,,\n", encoding="utf-8-sig")
    assert [(c.name, c.values) for c in grid.parse_grid(str(path))] == [
        ("fast", {"speed": "lightning-4", "identitynet_strength": "0.6"}), ("official", {})]
    (tmp_path / "bad.jsonl").write_text('{"name": "x", "prompt": "a cat"}\n')
    with pytest.raises(SettingsError, match="row 1: prompt cannot vary in a benchmark"):
        grid.parse_grid(str(tmp_path / "bad.jsonl"))
    (tmp_path / "twice.jsonl").write_text('{"name": "x"}\n{"name": "x", "steps": 3}\n')
    with pytest.raises(SettingsError, match="two configurations are named x"):
        grid.parse_grid(str(tmp_path / "twice.jsonl"))


def test_rows_go_setting_by_setting_with_the_same_seeds_for_every_setting(people_folder):
    """A setting's method and LoRAs load once per run: all its rows come together."""
    plan = run.plan(people_folder, "protocol", "speed=quality,lcm", seeds=2, smoke=True)
    assert [(r.record["configuration"], r.record["seed"], r.record["person"]) for r in plan.rows] == [
        ("speed=quality", 42, "ann"), ("speed=quality", 42, "bob"), ("speed=quality", 43, "ann"),
        ("speed=quality", 43, "bob"), ("speed=lcm", 42, "ann"), ("speed=lcm", 42, "bob"), ("speed=lcm", 43, "ann"),
        ("speed=lcm", 43, "bob")]
    assert [r.values["seed"] for r in plan.rows[::2]] == [42, 43, 42, 43] and plan.rows[0].key != plan.rows[4].key
    assert plan.rows[4].name == f"02-speed_lcm/ann-p01-s42-{plan.rows[4].key[:8]}"  # named by content too
    assert plan.rows[4].values["steps"] == 5 and plan.rows[0].values["steps"] == 30  # each preset's own steps


# ---------------------------------------------------------------------------------------------
# The metrics, by hand


def _clip_by_hand(folder: Path, image: Image.Image, prompt: str) -> float:
    """CLIP-T restated: resize (bicubic) to the vision tower's side, scale to [0, 1], CLIP's mean and std; the
    towers' pooled outputs through their projections; 100 x max(cosine, 0)."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    side = model.config.vision_config.image_size
    pixels = np.asarray(image.resize((side, side), Image.BICUBIC), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(((pixels - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)[None]).float()
    tokens = CLIPTokenizer.from_pretrained(folder)([prompt], return_tensors="pt")
    with torch.no_grad():
        picture = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(**tokens).pooler_output)
    return 100 * max(float(torch.nn.functional.cosine_similarity(picture, text)), 0.0)


def test_the_clip_score_is_clips_image_text_cosine_times_100(weights, loaded_judges):
    folder = model_folder(weights, "judges", judges.CLIP_REPO)
    for image, prompt in ((smoke.sample_face_image(96), "portrait, color, cinematic"),
                          (Image.new("RGB", (64, 64), (200, 30, 30)), "a person made of ice sculpture")):
        expected = _clip_by_hand(folder, image, prompt)
        assert loaded_judges.clip.score(image, prompt) == pytest.approx(expected, abs=2e-3)
        assert 0 < expected <= 100


def _sface_by_hand(model_path: Path, image: Image.Image, face) -> np.ndarray:
    """SFace restated: the five points onto the 112x112 template by a similarity transform (Umeyama), bilinear
    warp, RGB float blob, the ONNX graph run by onnxruntime."""
    import cv2
    from skimage.transform import SimilarityTransform

    points = np.asarray(face.kps, np.float64)
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        transform = SimilarityTransform.from_estimate(points, SFACE_TEMPLATE)
    else:
        transform = SimilarityTransform()
        transform.estimate(points, SFACE_TEMPLATE)
    bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
    aligned = cv2.warpAffine(bgr, transform.params[:2], (112, 112))
    blob = aligned[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32)
    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"data": blob})[0].reshape(-1)


def test_the_sface_judge_is_sfaces_cosine_on_faces_aligned_by_their_five_points(weights, session, loaded_judges):
    model_path = model_folder(weights, "judges", judges.SFACE_REPO) / judges.SFACE_FILE
    pictures = [smoke.sample_face_image(300), smoke.sample_face_image(256, face_color=BLUE)]
    faces = [session.faces.detect(picture) for picture in pictures]
    ours = [loaded_judges.sface.embed(picture, face) for picture, face in zip(pictures, faces)]
    by_hand = [_sface_by_hand(model_path, picture, face) for picture, face in zip(pictures, faces)]
    for mine, theirs in zip(ours, by_hand):
        assert float(np.dot(mine, theirs) / np.linalg.norm(mine) / np.linalg.norm(theirs)) > 0.9999
    expected = float(np.dot(by_hand[0], by_hand[1]) / np.linalg.norm(by_hand[0]) / np.linalg.norm(by_hand[1]))
    assert judges.cosine(ours[0], ours[1]) == pytest.approx(expected, abs=2e-4)


def _auraface_by_hand(model_path: Path, image: Image.Image, face) -> np.ndarray:
    """AuraFace as insightface's ArcFaceONNX runs a recogniser, restated: the five points onto ArcFace's 112x112
    template (the same numbers as SFace's), RGB scaled by (x - 127.5) / 127.5 (none for a graph that starts with
    its own Sub and Mul), the ONNX graph run by onnxruntime."""
    import cv2
    import onnx
    from skimage.transform import SimilarityTransform

    points = np.asarray(face.kps, np.float64)
    if hasattr(SimilarityTransform, "from_estimate"):
        transform = SimilarityTransform.from_estimate(points, SFACE_TEMPLATE)
    else:
        transform = SimilarityTransform()
        transform.estimate(points, SFACE_TEMPLATE)
    aligned = cv2.warpAffine(np.asarray(image), transform.params[:2], (112, 112), borderValue=0.0)
    first_ops = {node.op_type for node in onnx.load(str(model_path)).graph.node[:8]}
    mean, std = (0.0, 1.0) if {"Sub", "Mul"} <= first_ops else (127.5, 127.5)
    blob = ((aligned.astype(np.float32) - mean) / std).transpose(2, 0, 1)[None]
    model = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return model.run(None, {model.get_inputs()[0].name: blob})[0].reshape(-1)


def test_the_auraface_judge_is_the_recognisers_cosine_on_faces_aligned_to_arcfaces_template(weights, session,
                                                                                              loaded_judges):
    model_path = model_folder(weights, "judges", judges.AURAFACE_REPO) / judges.AURAFACE_FILE
    pictures = [smoke.sample_face_image(300), smoke.sample_face_image(256, face_color=BLUE)]
    faces = [session.faces.detect(picture) for picture in pictures]
    before = [face.embedding.copy() for face in faces]
    ours = [loaded_judges.auraface.embed(picture, face) for picture, face in zip(pictures, faces)]
    assert all(np.array_equal(face.embedding, kept) for face, kept in zip(faces, before))  # the face is not rewritten
    by_hand = [_auraface_by_hand(model_path, picture, face) for picture, face in zip(pictures, faces)]
    for mine, theirs in zip(ours, by_hand):
        assert mine.shape == (512,) and float(np.dot(mine, theirs) / np.linalg.norm(mine) / np.linalg.norm(theirs)) > 0.9999
    assert judges.NAMES["auraface"] == "AuraFace (fal/AuraFace-v1)" and judges.AURAFACE_FILE == "glintr100.onnx"


def test_copy_paste_is_multiid_benchs_angle_difference_over_the_reference_angle():
    given, held_out = np.array([1.0, 0.0]), np.array([0.0, 1.0])  # 90 degrees apart
    assert judges.copy_paste(given, given, held_out) == 1.0  # on the photos given
    assert judges.copy_paste(held_out, given, held_out) == -1.0  # on the held-out photo
    halfway = np.array([1.0, 1.0])
    assert judges.copy_paste(halfway, given, held_out) == 0.0
    tilted = np.array([np.cos(0.3), np.sin(0.3)])  # 0.3 rad from the photos given
    assert judges.copy_paste(tilted, given, held_out) == pytest.approx(((np.pi / 2 - 0.3) - 0.3) / (np.pi / 2), abs=1e-4)


def test_each_picture_is_measured_against_the_photos_given_and_the_held_out_photo_by_each_recogniser(
        people_folder, session, loaded_judges):
    people = references.find_people(people_folder)
    targets = run.references(session, loaded_judges, people)

    def cos(a, b):
        return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))

    def faced(path):
        photo = Image.open(path).convert("RGB")
        return photo, session.faces.detect(photo)

    (given_photo, given_face), (held_photo, held_face) = faced(people_folder / "bob" / "bob-1.png"), \
        faced(people_folder / "bob" / "bob-3.png")
    second = faced(people_folder / "bob" / "bob-2.png")
    picture = smoke.sample_face_image(272, face_color=BLUE)  # a "generated" picture of bob
    face = session.faces.detect(picture)
    figures = run.measure(session, loaded_judges, targets["bob"], picture, "portrait")

    assert figures["heldout_likeness"] == pytest.approx(cos(face.embedding, held_face.embedding), abs=1e-4)
    aura = loaded_judges.auraface
    aura_given = np.mean([aura.embed(p, f) / np.linalg.norm(aura.embed(p, f))
                          for p, f in ((given_photo, given_face), second)], axis=0)
    assert figures["auraface_given"] == pytest.approx(cos(aura.embed(picture, face), aura_given), abs=1e-4)
    aura_held = aura.embed(held_photo, held_face)
    assert figures["auraface_heldout"] == pytest.approx(cos(aura.embed(picture, face), aura_held), abs=1e-4)
    assert figures["sface_heldout"] == pytest.approx(
        cos(loaded_judges.sface.embed(picture, face), loaded_judges.sface.embed(held_photo, held_face)), abs=1e-4)
    angle = [float(np.arccos(np.clip(cos(a, b), -1, 1))) for a, b in (
        (aura.embed(picture, face), aura_held), (aura.embed(picture, face), aura_given), (aura_given, aura_held))]
    assert figures["copy_paste"] == pytest.approx((angle[0] - angle[1]) / angle[2], abs=2e-3)
    assert figures["clip_score"] == loaded_judges.clip.score(picture, "portrait")
    ceiling = np.mean([cos(aura.embed(p, f), aura_held) for p, f in ((given_photo, given_face), second)])
    assert targets["bob"].ceiling["auraface"] == pytest.approx(ceiling, abs=1e-4)
    assert set(targets["bob"].ceiling) == {"arcface", "auraface", "sface"}

    ann = run.measure(session, loaded_judges, targets["ann"], picture, "portrait")  # no held-out photo
    assert ann["heldout_likeness"] is None and ann["auraface_heldout"] is None and ann["copy_paste"] is None
    assert ann["auraface_given"] is not None and targets["ann"].ceiling == {}

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    faceless = run.measure(session, loaded_judges, targets["bob"], noise, "portrait")
    assert {name: value for name, value in faceless.items() if value is not None} == {"clip_score": faceless["clip_score"]}


def test_the_held_out_photo_is_the_last_as_a_file_browser_sorts_them(tmp_path):
    (tmp_path / "dan").mkdir()
    for name in ("IMG_2.jpg", "IMG_10.jpg", "img_3.JPG"):
        smoke.sample_face_image().save(tmp_path / "dan" / name, format="JPEG")
    (dan,) = references.find_people(tmp_path)
    assert [path.name for path in dan.references] == ["IMG_2.jpg", "img_3.JPG"] and dan.held_out.name == "IMG_10.jpg"


def test_a_persons_photo_without_a_face_is_named_before_any_image_is_made(tmp_path, session, loaded_judges):
    (tmp_path / "dan").mkdir()
    smoke.sample_face_image().save(tmp_path / "dan" / "a.png")
    Image.new("RGB", (256, 256), (128, 128, 128)).save(tmp_path / "dan" / "b.png")
    with pytest.raises(ValueError, match=r"person dan, photo .*b\.png: No face found"):
        run.references(session, loaded_judges, references.find_people(tmp_path))


# ---------------------------------------------------------------------------------------------
# The summary


def _line(key: str, likeness, aura, clip, seconds, heldout=None, status="done") -> dict:
    return {"key": key, "status": status, "identity_similarity": [likeness], "heldout_likeness": heldout,
            "auraface_given": aura, "clip_score": clip, "seconds": seconds, "files": []}


def _rows(settings=("a", "b"), seeds=(1, 2, 3)) -> list:
    rows = []
    for setting in settings:
        for seed in seeds:
            rows.append(batch.Row(len(rows) + 1, {}, {"person": "ann", "prompt": 1, "seed": seed,
                                                      "configuration": setting}, key=f"{setting}{seed}"))
    return rows


def test_the_summary_gives_mean_spread_n_faceless_count_and_paired_differences_by_hand():
    lines = [_line("a1", 0.5, 0.40, 20.0, 2.0), _line("a2", 0.6, 0.50, 22.0, 4.0), _line("a3", 0.7, 0.6, 24.0, 3.0),
             _line("b1", 0.4, 0.30, 25.0, 1.0), _line("b2", 0.5, 0.45, 27.0, 1.0), _line("b3", None, None, 26.0, 1.0),
             _line("stale", 0.9, 0.9, 90.0, 9.0)]
    summary = report.summarise(lines, _rows(), [("a", {}), ("b", {"speed": "lcm"})], judges.NAMES, loads={"b": 7.5})
    first, second = summary.settings
    assert (first.images, first.faceless, second.faceless) == (3, 0, 1)
    assert first.stats["likeness"].mean == pytest.approx(0.6) and first.stats["likeness"].sd == pytest.approx(0.1)
    ci = student_t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert first.stats["likeness"].ci95 == pytest.approx(ci)
    assert second.stats["auraface_given"].n == 2 and first.seconds.mean == pytest.approx(3.0)
    assert (first.load_seconds, second.load_seconds) == (None, 7.5)
    deltas = [0.30 - 0.40, 0.45 - 0.50]  # AuraFace pairs where both images have a face
    judged = summary.difference("b", "auraface_given")
    assert (judged.mean, judged.n) == (pytest.approx(statistics.fmean(deltas)), 2)
    assert judged.ci95 == pytest.approx(student_t.ppf(0.975, 1) * statistics.stdev(deltas) / math.sqrt(2))
    clip = summary.difference("b", "clip_score")
    assert (clip.mean, clip.n) == (pytest.approx(statistics.fmean([5.0, 5.0, 2.0])), 3)
    table = summary.table_markdown()
    assert "| a | 3 | 0 | 0 | 0.600 ± 0.100 (n 3) | — | — | 0.500 ± 0.100 (n 3) | — | — | — | 22.0 ± 2.0 (n 3) | 3.00 | — | — |" in table
    assert "| b | -0.100 [" in table
    # the same columns in the same order in both tables
    headers = [line for line in table.splitlines() if line.startswith("| setting |")]
    assert headers[0].split(" | ")[4:4 + len(report.METRICS)] == headers[1].rstrip(" |").split(" | ")[1:]
    assert '- `b`: {"speed": "lcm"}' in table and "- `a`: the defaults" in table


def test_a_row_that_failed_and_was_made_on_a_rerun_counts_as_made():
    lines = [_line("a1", 0.5, 0.4, 20.0, 2.0, status="failed"), _line("a1", 0.5, 0.4, 20.0, 2.0)]
    (summary,) = report.summarise(lines, _rows(("a",), (1,)), [("a", {})], judges.NAMES).settings
    assert (summary.images, summary.failed) == (1, 0)
    again = report.summarise(lines[::-1], _rows(("a",), (1,)), [("a", {})], judges.NAMES).settings[0]
    assert (again.images, again.failed) == (0, 1)  # the later line is the one that counts


def test_the_plot_shows_the_paired_differences_and_the_csv_holds_them():
    lines = [_line(f"{setting}{seed}", 0.5, aura, clip, 1.0) for setting, seed, aura, clip in (
        ("a", 1, 0.40, 20.0), ("a", 2, 0.50, 22.0), ("a", 3, 0.45, 21.0),
        ("b", 1, 0.50, 20.5), ("b", 2, 0.62, 22.4), ("b", 3, 0.53, 21.6))]
    summary = report.summarise(lines, _rows(), [("a", {}), ("b", {})], judges.NAMES)
    assert summary.plot_likeness() == "auraface_given"
    (x0, _, y0, _), (x, x_bar, y, y_bar) = summary.plot_points()
    clip, aura = summary.difference("b", "clip_score"), summary.difference("b", "auraface_given")
    assert (x0, y0) == (0.0, 0.0) and (x, x_bar, y, y_bar) == (clip.mean, clip.ci95, aura.mean, aura.ci95)
    assert aura.clear  # +0.1 each time: the plot's bar leaves out 0 as the table's interval does
    assert (x - x_bar > 0) == (clip.mean - clip.ci95 > 0)


def test_the_contact_sheet_puts_each_caption_under_its_picture_and_explains_itself(tmp_path):
    small = tmp_path / "small.png"
    Image.new("RGB", (128, 128), (200, 30, 30)).save(small)
    sheet = batch.draw_sheet([[(small, "ann p1 s42\nL 0.51 C 24.0")], [(small, "second row")]],
                             footer=["L: ArcFace likeness to the photos given"])
    pixels = np.asarray(sheet.convert("L"))
    red_rows = np.nonzero((np.asarray(sheet)[:, 100, 0] == 200) & (np.asarray(sheet)[:, 100, 1] == 30))[0]
    first_picture_end = red_rows[red_rows < batch.THUMB + batch.CAPTION].max()
    caption_band = pixels[first_picture_end + 1:first_picture_end + 30, :120]
    assert (caption_band < 100).any()  # text right under the picture (it was drawn 120 px lower, over the next one)
    gap = pixels[first_picture_end + 32:batch.THUMB + batch.CAPTION, :]
    assert (gap > 250).all()  # nothing between the caption and the next row
    assert (pixels[-20:, :] < 150).any()  # the key at the bottom


# ---------------------------------------------------------------------------------------------
# The command


def test_bench_smoke_writes_results_tables_plot_sheet_and_best_settings_and_a_second_run_makes_nothing(
        people_folder, tmp_path, capsys, monkeypatch):
    prompts_file = tmp_path / "two.txt"
    prompts_file.write_text("portrait of a person\na person on a beach\n")
    out = tmp_path / "out"
    argv = ["bench", "--smoke", "--faces", str(people_folder), "--grid", "speed=quality,lightning-4", "--seeds", "1",
            "--prompts", str(prompts_file), "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "8 images: 2 people x 2 prompts x 2 settings x 1 seeds" in printed and f"[{smoke.SMOKE_LABEL}]" in printed
    lines = batch.results(out)
    assert len(lines) == 8 and {line["status"] for line in lines} == {"done"}
    assert all(isinstance(line["clip_score"], float) for line in lines)
    with open(out / report.CSV_TABLE, encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [row["setting"] for row in table] == ["speed=quality", "speed=lightning-4"]
    for row in table:
        assert int(row["images"]) == 4 and float(row["clip_score_mean"]) > 0 and float(row["seconds_per_image"]) > 0
        assert row["label"] == smoke.SMOKE_LABEL and float(row["load_seconds"]) >= 0
        faceless = int(row["faceless"])  # smoke pictures are noise: likeness is empty where no face was found
        assert int(row["auraface_given_n"]) == 4 - faceless and (row["auraface_given_mean"] == "") == (faceless == 4)
    assert table[1]["clip_score_diff_n"] == "4" and table[0]["clip_score_diff_n"] == "0"  # paired, in the CSV too
    markdown = (out / report.TABLE).read_text()
    assert smoke.SMOKE_LABEL in markdown and "| speed=lightning-4 | 4 |" in markdown
    assert "Held out (never given to the generator): bob: bob-3.png." in markdown
    assert "| bob | AuraFace | " in markdown  # the same-person ceiling (calibration.json)
    assert json.loads((out / run.CALIBRATION).read_text())["bob"]["held_out"] == "bob-3.png"
    assert [json.loads(line)["configuration"] for line in (out / run.LOADS).read_text().splitlines()] == [
        "speed=quality", "speed=lightning-4"]
    best = sorted((out / report.BEST).glob("*.json"))
    assert best and all(json.loads(path.read_text())["label"] == smoke.SMOKE_LABEL for path in best)
    assert Image.open(out / report.PLOT).size[0] > 300
    assert Image.open(out / report.SHEET).size[0] == 2 * batch.THUMB
    files = sorted(str(path.relative_to(out)) for path in out.glob("0*/*.png"))
    assert files[0].startswith("01-speed_quality/ann-p01-s42-") and len(files) == 8

    assert cli.main(argv) == 0
    assert "All 8 images are in" in capsys.readouterr().out and len(batch.results(out)) == 8

    moved = tmp_path / "elsewhere" / "bench"  # the folder moved, and the command run from another folder
    moved.parent.mkdir()
    out.rename(moved)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli.main([*argv[:-1], "bench"]) == 0
    assert "All 8 images are in" in capsys.readouterr().out
    (moved / files[3]).unlink()  # a picture deleted by hand: made again, not a crash
    assert cli.main([*argv[:-1], "bench"]) == 0
    assert "1 made here, 7 already done" in capsys.readouterr().out and (moved / files[3]).is_file()


def test_a_settings_file_from_bench_makes_generate_and_batch_reproduce_its_setting(people_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["bench", "--smoke", "--faces", str(people_folder), "--grid", "speed=lightning-4; "
                     "identitynet_strength=0.6", "--prompts", "protocol", "--out", str(out)]) == 0
    (chosen,) = (out / report.BEST).glob("*.json")
    assert json.loads(chosen.read_text())["settings"] == {"speed": "lightning-4", "identitynet_strength": "0.6"}
    made = tmp_path / "ann.png"
    assert cli.main(["generate", "--smoke", "--face", str(people_folder / "ann.png"), "--prompt", prompts.PROTOCOL.text,
                     "--seed", "42", "--settings", str(chosen), "--out", str(made)]) == 0
    stored = json.loads(Image.open(made).text["instantid"])
    assert (stored["speed"]["name"], stored["identitynet_strength"], stored["steps"]) == ("lightning-4", 0.6, 4)
    (bench_picture,) = (out / "01-speed_lightning-4_identitynet_strength_0.6").glob("ann-p01-s42-*.png")
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(bench_picture)))
    typed = tmp_path / "typed.png"  # what is typed wins over the file
    assert cli.main(["generate", "--smoke", "--face", str(people_folder / "ann.png"), "--seed", "42",
                     "--settings", str(chosen), "--identitynet-strength", "0.9", "--out", str(typed)]) == 0
    assert json.loads(Image.open(typed).text["instantid"])["identitynet_strength"] == 0.9
    manifest = tmp_path / "m.csv"
    manifest.write_text(f'face,prompt,seed\n{people_folder / "ann.png"},"{prompts.PROTOCOL.text}",42\n')
    assert cli.main(["batch", str(manifest), "--smoke", "--settings", str(chosen), "--out", str(tmp_path / "b")]) == 0
    (line,) = batch.results(tmp_path / "b")
    assert (line["settings"]["speed"]["name"], line["settings"]["identitynet_strength"]) == ("lightning-4", 0.6)
    capsys.readouterr()
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"settings": {"cfg": 3}}')
    assert cli.main(["generate", "--smoke", "--settings", str(wrong), "--out", str(tmp_path / "w.png")]) == 2
    assert "'cfg' is not a setting this command takes from a file" in capsys.readouterr().err


def test_a_settings_load_is_timed_apart_from_the_images_seconds(people_folder, tmp_path, monkeypatch):
    """A setting's first use loads its LoRA (here: a second's sleep in the first call of each speed mode): that call
    is the one-step 64 px load before the setting's first row, timed into loads.jsonl, never one of its images."""
    from instantid_colab import pipeline

    generate, first_calls = pipeline.generate, {}

    def loading(session, *args, **kwargs):
        if kwargs.get("speed") not in first_calls:
            first_calls[kwargs.get("speed")] = (kwargs.get("width"), kwargs.get("steps"))
            time.sleep(1.0)
        return generate(session, *args, **kwargs)

    monkeypatch.setattr(pipeline, "generate", loading)
    out = tmp_path / "out"
    assert cli.main(["bench", "--smoke", "--faces", str(people_folder), "--grid", "speed=quality,lightning-4",
                     "--prompts", "protocol", "--out", str(out)]) == 0
    assert first_calls == {"quality": (64, 1), "lightning-4": (64, 1)}  # the load, not a 128 px image of 30 or 4 steps
    loads = {json.loads(line)["configuration"]: json.loads(line)["seconds"] for line in (out / run.LOADS).read_text().splitlines()}
    assert set(loads) == {"speed=quality", "speed=lightning-4"} and min(loads.values()) >= 1.0


@pytest.mark.parametrize(("extra", "message"), [
    (["--grid", "speed=warp"], "grid setting 'speed=warp': speed 'warp' is not one of"),
    (["--grid", "cfg=1,2"], "grid: 'cfg' is not a setting the grid can vary"),
    (["--seeds", "0"], "seeds 0 is out of range: use 1 to 64"),
])
def test_bench_refuses_a_wrong_grid_or_seed_count_with_exit_2(people_folder, tmp_path, capsys, extra, message):
    assert cli.main(["bench", "--smoke", "--faces", str(people_folder), "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / batch.RESULTS).exists()


def test_bench_needs_faces_outside_smoke_mode_and_a_folder_for_out(tmp_path, capsys):
    assert cli.main(["bench", "--out", str(tmp_path / "o")]) == 2
    assert "--faces is required" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli.main(["bench", "--smoke", "--out", str(tmp_path / "file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
