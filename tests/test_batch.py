"""The batch command: manifests, resume by content, failures recorded, rows shared between processes (smoke)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from instantid_colab import batch, cli, memory, pipeline, smoke

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return smoke.build_smoke_weights(tmp_path_factory.mktemp("smoke"))


@pytest.fixture(scope="module")
def session(weights):
    return pipeline.load_pipeline(weights, memory.choose_plan(16, None), progress=False)


@pytest.fixture
def folder(tmp_path):
    smoke.sample_face_image().save(tmp_path / "ann.png")
    smoke.sample_face_image(face_color=(150, 210, 240)).save(tmp_path / "bob.png")
    Image.new("RGB", (256, 256), (128, 128, 128)).save(tmp_path / "grey.png")
    return tmp_path


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


CSV = """
    face,prompt,seed,steps,num_images,controls,loras
    ann.png,a pilot,1,2,,,
    bob.png,a painter,,2,2,canny=ann.png:0.5,smoke:0.5
    ann.png,a chef,3,1,,,
    """


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / batch.RESULTS).read_text().splitlines()]


def test_csv_rows_make_pngs_results_and_a_contact_sheet_then_a_rerun_makes_nothing(session, folder):
    rows = batch.prepare_rows(write(folder, "m.csv", CSV), smoke=True)
    assert [row.number for row in rows] == [1, 2, 3]
    assert 0 <= rows[1].values["seed"] < 2**32  # none given: derived from the row's content
    report = batch.run(session, rows, folder / "out", progress=False)
    assert (report.made, report.skipped, report.failed) == (3, 0, 0)
    done = lines(folder / "out")
    assert [line["row"] for line in done] == [1, 2, 3] and {line["status"] for line in done} == {"done"}
    assert [len(line["files"]) for line in done] == [1, 2, 1]
    assert done[0]["seed"] == 1 and done[2]["seed"] == 3 and done[1]["settings"]["loras"] == [{"name": "smoke", "scale": 0.5}]
    assert done[1]["settings"]["controls"][0]["kind"] == "canny"
    assert all((folder / "out" / file).is_file() for line in done for file in line["files"])  # relative to --out
    stored = json.loads(Image.open(folder / "out" / done[1]["files"][1]).text["instantid"])
    assert stored["image_index"] == 1 and stored["seed"] == done[1]["seed"]
    assert (folder / "out" / batch.CONTACT_SHEET).is_file()
    again = batch.run(session, batch.prepare_rows(folder / "m.csv", smoke=True), folder / "out", progress=False)
    assert (again.made, again.skipped) == (0, 3) and len(lines(folder / "out")) == 3


def test_a_row_is_keyed_by_its_content(folder):
    first = batch.prepare_rows(write(folder, "a.jsonl", '{"face": "ann.png", "prompt": "x"}\n'), smoke=True)[0]
    same = batch.prepare_rows(write(folder, "b.jsonl", '{"face": "ann.png", "prompt": "x"}\n'), smoke=True)[0]
    other = batch.prepare_rows(write(folder, "c.jsonl", '{"face": "bob.png", "prompt": "x"}\n'), smoke=True)[0]
    steps = batch.prepare_rows(write(folder, "d.jsonl", '{"face": "ann.png", "prompt": "x", "steps": 29}\n'), smoke=True)[0]
    assert first.key == same.key and first.values["seed"] == same.values["seed"]  # derived from the content
    assert len({first.key, other.key, steps.key}) == 3


def test_an_interrupted_batch_resumes_with_what_is_missing(session, folder):
    rows = batch.prepare_rows(write(folder, "m.csv", CSV), smoke=True)

    def interrupt(row, result):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        batch.run(session, rows, folder / "out", progress=False, on_row=interrupt)
    assert [line["row"] for line in lines(folder / "out")] == [1]
    report = batch.run(session, rows, folder / "out", progress=False)
    assert (report.made, report.skipped) == (2, 1)
    assert sorted(line["row"] for line in lines(folder / "out")) == [1, 2, 3]


def test_a_row_without_a_face_is_recorded_as_failed_and_the_rest_is_made(session, folder):
    rows = batch.prepare_rows(write(folder, "m.jsonl", """
        {"face": "grey.png", "steps": 1}
        {"face": "ann.png", "steps": 1}
        """), smoke=True)
    report = batch.run(session, rows, folder / "out", progress=False)
    failed, done = lines(folder / "out")
    assert (report.made, report.failed) == (1, 1)
    assert failed["status"] == "failed" and failed["error"].startswith("No face found")
    assert done["status"] == "done"
    assert batch.run(session, rows, folder / "out", progress=False).made == 0  # the reason is on record


def test_every_bad_row_is_listed_before_anything_loads(folder):
    manifest = write(folder, "bad.csv", """
        face,prompt,steps,colour,controls
        ann.png,ok,30,,
        missing.png,x,30,,
        ann.png,x,0,,
        ann.png,x,30,red,
        ann.png,x,30,,hands=ann.png
        """)
    with pytest.raises(batch.ManifestError) as caught:
        batch.prepare_rows(manifest)
    message = str(caught.value)
    assert "4 of the rows cannot run; nothing was made" in message
    assert "row 2: face photo: " in message and "missing.png does not exist" in message
    assert "row 3: steps 0 is out of range: use 1 to 100" in message
    assert "row 4: unknown column(s) colour" in message
    assert "row 5: control 'hands' is not one of: pose, canny, depth" in message
    assert "row 1:" not in message


def _process(folder: Path, manifest: Path, run_id: str, crash_at_row: int | None = None) -> subprocess.Popen:
    """A separate batch process (as accelerate would start one), optionally dying hard at one row."""
    code = textwrap.dedent(f"""
        import os, sys
        from instantid_colab import batch, cli, pipeline
        original = pipeline.generate
        def generate(*args, **kwargs):
            if {crash_at_row!r} is not None and kwargs.get("prompt") == "row {crash_at_row}":
                os._exit(9)  # a process that dies mid-row, no clean-up
            return original(*args, **kwargs)
        pipeline.generate = generate
        sys.exit(cli.main(["batch", {str(manifest)!r}, "--out", {str(folder / 'out')!r}, "--smoke"]))
        """)
    env = {**os.environ, "TORCHELASTIC_RUN_ID": run_id, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_processes_share_the_rows_and_take_over_a_dead_ones_row(folder):
    manifest = write(folder, "m.jsonl", "".join(f'{{"prompt": "row {n}", "steps": 1, "seed": {n}}}\n' for n in range(1, 7)))
    dying = _process(folder, manifest, "run-1", crash_at_row=2)
    assert dying.wait(timeout=600) == 9
    claims = [path.read_text() for path in (folder / "out" / "claims").iterdir() if not path.name.startswith(".")]
    # its rows in flight (the one it made, the one it was writing), held by a process that no longer runs
    assert 1 <= len(claims) <= 2 and all(claim.startswith(f"run-1 {dying.pid}") for claim in claims)
    survivors = [_process(folder, manifest, "run-1") for _ in range(2)]
    assert [process.wait(timeout=600) for process in survivors] == [0, 0]
    done = lines(folder / "out")
    assert sorted(line["row"] for line in done) == [1, 2, 3, 4, 5, 6]  # no row lost, none twice
    assert len({line["key"] for line in done}) == 6
    by_row = {line["row"]: line for line in done}
    assert by_row[2]["pid"] != dying.pid  # row 2 was taken over


def test_gpus_option_relaunches_the_same_command_under_accelerate(capsys):
    seen = []
    code = cli._launch_on_gpus(2, ["batch", "m.csv", "--out", "o", "--gpus", "2", "--smoke"], runner=seen.append)
    assert seen == [[sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                     "-m", "instantid_colab", "batch", "m.csv", "--out", "o", "--smoke"]]
    assert code is None and "accelerate.commands.launch" in capsys.readouterr().out


def test_cli_batch_smoke(folder, capsys):
    manifest = write(folder, "m.csv", "prompt,steps\na,1\nb,1\n")
    assert cli.main(["batch", str(manifest), "--out", str(folder / "o"), "--smoke"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"[{smoke.SMOKE_LABEL}]\n2 rows: 2 made here, 0 already done, 0 failed")
    assert cli.main(["batch", str(folder / "nope.csv"), "--out", str(folder / "o"), "--smoke"]) == 1
    assert "manifest " in capsys.readouterr().err


def test_a_people_column_makes_one_picture_of_several_people(session, folder):
    manifest = write(folder, "people.csv", """
        people,person_masks,prompt,seed,steps
        ann.png;bob.png+ann.png,,two friends,1,1
        ann.png;bob.png,grey.png;grey.png,two friends,2,1
        """)
    rows = batch.prepare_rows(manifest, smoke=True)
    assert [len(person.photos) for person in rows[0].values["people"]] == [1, 2]
    assert rows[1].values["people"][0].mask.size == (256, 256)
    report = batch.run(session, rows, folder / "out", progress=False)
    assert (report.made, report.failed) == (2, 0)
    first = lines(folder / "out")[0]
    assert len(first["people_similarity"][0]) == 2 and len(first["settings"]["people"]) == 2
    refused = write(folder, "both.csv", "face,people\nann.png,ann.png;bob.png\n")
    with pytest.raises(batch.ManifestError, match=r"row 1: give face \(one person\) or people \(2 to 4\), not both"):
        batch.prepare_rows(refused, smoke=True)


@pytest.mark.parametrize(("encoding", "delimiter"), [("utf-8-sig", ","), ("cp1252", ";"), ("utf-16", "\t"), ("utf-8", ",")])
def test_csv_as_spreadsheets_save_it(folder, encoding, delimiter):
    """Excel's "CSV UTF-8" (BOM), plain "CSV" on a Western Windows (Windows-1252, ';' where the decimal is a comma),
    "Unicode Text" (UTF-16, tabs) and a plain UTF-8 file all read the same."""
    text = delimiter.join(["face", "prompt", "seed"]) + "\r\n" + delimiter.join(["ann.png", "café crème", "1"]) + "\r\n"
    path = folder / "excel.csv"
    path.write_bytes(text.encode(encoding))
    assert batch.read_manifest(path) == [{"face": "ann.png", "prompt": "café crème", "seed": "1"}]


def test_a_manifest_that_is_not_text_is_refused_naming_what_to_save(folder):
    path = folder / "sheet.csv"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)  # an .xlsx renamed to .csv
    with pytest.raises(batch.ManifestError, match=r"sheet\.csv is not text in UTF-8, UTF-16 or Windows-1252: save it "
                                                  r"as \"CSV UTF-8\""):
        batch.read_manifest(path)


def test_a_refine_face_column_runs_the_refine_pass(session, folder):
    rows = batch.prepare_rows(write(folder, "refine.csv", "face,seed,steps,refine_face\nann.png,1,2,0.5\n"), smoke=True)
    assert rows[0].values["refine_face"] == 0.5
    batch.run(session, rows, folder / "out", progress=False)
    (png,) = (folder / "out").glob("0001-*.png")
    assert json.loads(Image.open(png).text["instantid"])["refine_face"]["strength"] == 0.5
    with pytest.raises(batch.ManifestError, match=r"row 1: refine_face 2.0 is out of range: use 0.01 to 1"):
        batch.prepare_rows(write(folder, "bad.csv", "face,refine_face\nann.png,2\n"), smoke=True)


def test_batch_speed_applies_to_rows_without_a_speed_column(folder):
    manifest = write(folder, "speed.csv", "face,speed,seed\nann.png,,1\nbob.png,tcd,2\n")
    rows = batch.prepare_rows(manifest, smoke=True, speed="lightning-4")
    assert [(row.values["speed"], row.values["steps"]) for row in rows] == [("lightning-4", 4), ("tcd", 4)]
    assert rows[0].values["scheduler"] == "Euler trailing" and rows[1].values["scheduler"] == "TCD"


# --- issue 25: a value means the same in a CSV cell, a JSONL value, the command line and the app --------------


def test_a_jsonl_value_of_the_wrong_type_is_refused_naming_it(folder):
    manifest = write(folder, "t.jsonl", '{"face": "ann.png", "guidance_interval": 0.5}\n'
                                        '{"face": "ann.png", "steps": true}\n'
                                        '{"face": "ann.png", "controls": {"pose": "ann.png"}}\n')
    with pytest.raises(batch.ManifestError) as refused:
        batch.prepare_rows(manifest, smoke=True)
    text = str(refused.value)
    assert "row 1: guidance interval 0.5 is not START,END" in text
    assert "row 2: steps true is not what the column holds (one value" in text
    assert 'row 3: controls {"pose": "ann.png"} is not what the column holds (a list or a text' in text
    row, = batch.prepare_rows(write(folder, "ok.jsonl", '{"face": "ann.png", "prompt": 2024, '
                                                        '"guidance_interval": [0.2, 0.8]}\n'), smoke=True)
    assert (row.values["prompt"], row.values["guidance_interval"]) == ("2024", (0.2, 0.8))  # as in a CSV cell


@pytest.mark.parametrize(("csv_value", "jsonl_value", "strength"), [
    ("true", "true", 0.4), ("yes", '"on"', 0.4), ("0.6", "0.6", 0.6), ("false", "false", None), ("no", '"off"', None),
])
def test_refine_face_means_the_same_in_csv_and_jsonl_as_on_the_command_line(folder, csv_value, jsonl_value, strength):
    from_csv, = batch.prepare_rows(write(folder, "r.csv", f"face,refine_face\nann.png,{csv_value}\n"), smoke=True)
    from_jsonl, = batch.prepare_rows(write(folder, "r.jsonl", f'{{"face": "ann.png", "refine_face": {jsonl_value}}}\n'),
                                     smoke=True)
    assert from_csv.values["refine_face"] == from_jsonl.values["refine_face"] == strength  # true: --refine-face's 0.4


def test_a_csv_row_with_more_fields_than_the_header_is_refused(folder):
    manifest = write(folder, "c.csv", """
        face,prompt,seed
        ann.png,a portrait,1
        ann.png,a portrait, at night,2
        """)
    with pytest.raises(batch.ManifestError, match=r"row 2 has 4 fields, the header 3\. A value holding the separator "
                                                  r"\(','\) must be in double quotes"):
        batch.read_manifest(manifest)


def test_order_without_a_pose_photo_is_refused_in_a_manifest(folder):
    manifest = write(folder, "p.jsonl", '{"people": ["ann.png", "bob.png"], "order": "2,1"}\n')
    with pytest.raises(batch.ManifestError, match=r"row 1: order places the people on the faces of the pose"):
        batch.prepare_rows(manifest, smoke=True)


def test_a_failed_row_is_tried_again_by_the_next_run(session, folder):
    rows = batch.prepare_rows(write(folder, "f.jsonl", '{"face": "grey.png", "steps": 1}\n'), smoke=True)
    first = batch.run(session, rows, folder / "out", progress=False)
    second = batch.run(session, rows, folder / "out", progress=False)
    assert (first.failed, second.failed, second.skipped) == (1, 1, 0)
    assert [line["status"] for line in lines(folder / "out")] == ["failed", "failed"]
