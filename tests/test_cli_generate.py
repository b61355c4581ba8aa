"""`python -m instantid_colab generate` end to end in smoke mode: what it prints and writes."""

from __future__ import annotations

import json

from PIL import Image

from instantid_colab import cli, smoke


def test_smoke_generate_prints_the_likeness_of_each_image_and_writes_it_into_the_png(tmp_path, capsys):
    out = tmp_path / "portrait.png"
    code = cli.main(["generate", "--smoke", "--steps", "2", "--seed", "5", "--num-images", "2", "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    assert printed[0] == f"[{smoke.SMOKE_LABEL}]"
    rows = [line for line in printed if "saved" in line]
    # Smoke pictures are noise: whether the tiny smoke detector sees a "face" in one depends on the library
    # versions. What must hold: each printed score is the one stored in that PNG, best first, null with its reason.
    stored = {name: json.loads(Image.open(tmp_path / name).text["instantid"]) for name in ("portrait-0.png", "portrait-1.png")}
    scores = {name: meta["identity_similarity"] for name, meta in stored.items()}
    order = sorted(scores, key=lambda name: -1 if scores[name] is None else scores[name], reverse=True)
    expected = [f"likeness {scores[name]:.2f}" if scores[name] is not None
                else "likeness n/a (no face found in the generated image)" for name in order]
    assert rows == [f"  {text:<52} saved {tmp_path / name}" for text, name in zip(expected, order)]
    for meta in stored.values():
        assert meta["identity_similarity_note"] == (None if meta["identity_similarity"] is not None
                                                    else "no face found in the generated image")
        assert meta["identity_similarity"] is None or -1 <= meta["identity_similarity"] <= 1
    assert [meta["seed"] for meta in stored.values()] == [5, 5]
    assert [meta["image_index"] for meta in stored.values()] == [0, 1]


def test_controls_lora_and_start_photo_from_the_command_line_land_in_the_png(tmp_path, capsys):
    photo = tmp_path / "photo.png"
    smoke.sample_face_image().save(photo)
    out = tmp_path / "x.png"
    code = cli.main(["generate", "--smoke", "--steps", "3", "--seed", "8", "--control", f"pose={photo}",
                     "--control", f"canny={photo}:0.5", "--control", f"depth={photo}", "--control-range", "depth=0.2:0.9",
                     "--lora", "smoke:0.7", "--init-image", str(photo), "--init-strength", "0.6", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    stored = json.loads(Image.open(out).text["instantid"])
    assert [(c["kind"], c["strength"], c["start"], c["end"], c["source"]) for c in stored["controls"]] == [
        ("pose", 0.4, 0.0, 1.0, "photo"), ("canny", 0.5, 0.0, 1.0, "photo"), ("depth", 0.4, 0.2, 0.9, "photo")]
    assert [c["model"] for c in stored["controls"]] == ["thibaud/controlnet-openpose-sdxl-1.0",
                                                        "diffusers/controlnet-canny-sdxl-1.0",
                                                        "diffusers/controlnet-depth-sdxl-1.0-small"]
    assert stored["loras"] == [{"name": "smoke", "scale": 0.7}]
    assert stored["init_image"]["strength"] == 0.6
    assert "control depth (photo, diffusers/controlnet-depth-sdxl-1.0-small): strength 0.4, steps 20%-90%" in printed
    assert "LoRA smoke x 0.7" in printed
