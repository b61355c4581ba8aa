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
    assert rows == [f"  {'likeness n/a (no face found in the generated image)':<52} saved {tmp_path / name}"
                    for name in ("portrait-0.png", "portrait-1.png")]
    stored = json.loads(Image.open(tmp_path / "portrait-1.png").text["instantid"])
    assert (stored["identity_similarity"], stored["identity_similarity_note"]) == (
        None, "no face found in the generated image")
    assert stored["seed"] == 5 and stored["image_index"] == 1
