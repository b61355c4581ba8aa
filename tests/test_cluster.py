"""`batch --ray` and `bench --ray` on a local Ray with two CPU workers and the smoke weights: the same pictures and
tables as one process, a killed worker's row made once by another, a stopped driver resumed."""

from __future__ import annotations

import csv
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
import torch
from PIL import Image

from instantid_colab import batch, cluster, smoke
from instantid_colab.bench import run as bench
from instantid_colab.cli import main
from instantid_colab.weights_request import WeightsRequest

SMOKE = WeightsRequest(smoke=True)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


def manifest_rows(folder: Path, count: int, steps: int = 3) -> list[batch.Row]:
    folder.mkdir(parents=True, exist_ok=True)
    smoke.sample_face_image(256).save(folder / "face.png")
    (folder / "rows.csv").write_text("face,prompt,seed,steps\n" + "".join(
        f"face.png,a portrait number {index},{index},{steps}\n" for index in range(count)))
    return batch.prepare_rows(folder / "rows.csv", smoke=True)


def same_files(session) -> WeightsRequest:
    """The workers read the files `session` was loaded from (as from a shared `--weights-dir`): the smoke files of
    another folder, written by another version of transformers, hold other random weights."""
    return WeightsRequest(smoke=True, paths=session.weights)


def picture(out: Path, line: dict) -> tuple[bytes, str]:
    (path,) = batch.pictures(out, line)
    with Image.open(path) as image:
        return image.tobytes(), image.text["instantid"]


def test_ray_makes_the_pictures_one_process_makes_and_a_stopped_driver_resumes(local_ray, smoke_session, tmp_path):
    rows = manifest_rows(tmp_path, 6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray CPU worker (OMP_NUM_THREADS=1): the same float sums
    try:
        batch.run(smoke_session, rows, tmp_path / "one", progress=False, sheet=False)
    finally:
        torch.set_num_threads(threads)

    def stop_after_two(row, line):
        if len(batch.results(tmp_path / "ray")) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the driver

    with pytest.raises(KeyboardInterrupt):
        cluster.run_rows(rows, tmp_path / "ray", same_files(smoke_session), workers=2, progress=False,
                         on_row=stop_after_two)
    assert len(batch.done_keys(tmp_path / "ray")) == 2
    report = cluster.run_rows(rows, tmp_path / "ray", same_files(smoke_session), workers=2, progress=False)
    assert (report.made, report.skipped, report.failed) == (4, 2, 0)
    lines = batch.results(tmp_path / "ray")
    assert sorted(line["key"] for line in lines) == sorted(row.key for row in rows)  # each made once
    one = batch.latest(batch.results(tmp_path / "one"))
    for line in lines:
        assert picture(tmp_path / "ray", line) == picture(tmp_path / "one", one[line["key"]]), line["row"]
    assert {line["process"] for line in lines} == {0, 1}  # both workers made rows


def test_a_worker_killed_mid_row_has_its_rows_made_once_by_another(local_ray, tmp_path):
    rows = manifest_rows(tmp_path, 6, steps=12)
    finished = {}
    runner = threading.Thread(target=lambda: finished.update(report=cluster.run_rows(
        rows, tmp_path / "out", SMOKE, workers=2, progress=False)))
    runner.start()
    deadline = time.monotonic() + 600
    while not batch.results(tmp_path / "out") and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = [process for process in psutil.process_iter(["cmdline"])
               if "RowMaker" in " ".join(process.info["cmdline"] or ())]
    assert len(workers) == 2
    workers[0].send_signal(signal.SIGKILL)  # its process gone, as when a node is lost
    runner.join(timeout=600)
    report = finished["report"]
    assert report.made == 6 and report.failed == 0 and report.retried >= 1
    lines = batch.results(tmp_path / "out")
    assert len(lines) == 6 and {line["key"] for line in lines} == {row.key for row in rows}
    assert "given to another worker after theirs died" in report.render()


def test_bench_on_ray_gives_the_table_one_process_gives(local_ray, smoke_session, tmp_path):
    grid = "adapter_strength=0.6,0.8"
    one = bench.plan_smoke_people(tmp_path / "one", "protocol", grid)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bench.run(smoke_session, one, tmp_path / "one", progress=False)
    finally:
        torch.set_num_threads(threads)
    on_ray = bench.plan_smoke_people(tmp_path / "ray", "protocol", grid)
    report = cluster.run_rows(on_ray.rows, tmp_path / "ray", same_files(smoke_session), workers=2, bench=on_ray,
                              progress=False)
    assert report.made == len(on_ray.rows) == 4
    bench.report(on_ray, tmp_path / "ray", smoke.SMOKE_LABEL)
    timing = {"seconds_per_image", "load_seconds", "peak_vram_gib", "best"}  # best: the fastest counts too

    def table(folder: Path) -> list[dict]:
        with open(folder / "table.csv", encoding="utf-8") as handle:
            return [{k: v for k, v in row.items() if k not in timing} for row in csv.DictReader(handle)]

    assert table(tmp_path / "ray") == table(tmp_path / "one") and len(table(tmp_path / "one")) == 2
    assert (tmp_path / "ray" / bench.CALIBRATION).read_text() == (tmp_path / "one" / bench.CALIBRATION).read_text()
    assert {line.split('"configuration": ')[1].split(",")[0] for line in
            (tmp_path / "ray" / bench.LOADS).read_text().splitlines()} == {'"adapter_strength=0.6"',
                                                                          '"adapter_strength=0.8"'}


@pytest.mark.parametrize("extra, said", [
    (["--ray-workers", "2"], "--ray-workers needs --ray"),
    (["--ray", "--gpus", "2"], "give --ray (Ray workers, one per GPU) or --gpus N"),
    (["--ray", "--ray-workers", "0"], "ray_workers 0 is out of range"),
])
def test_ray_options_are_checked_before_anything_loads(tmp_path, capsys, extra, said):
    assert main(["batch", str(tmp_path / "none.csv"), "--smoke", "--out", str(tmp_path / "out"), *extra]) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_ray_missing_is_said_with_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as on a machine without the extra
    assert main(["bench", "--smoke", "--ray", "--out", str(tmp_path / "out")]) == 2
    assert 'pip install "instantid-colab[ray]"' in capsys.readouterr().err


def test_photos_travel_once_whatever_the_rows_share(local_ray):
    face = smoke.sample_face_image(64)
    rows = [batch.Row(number, {"face_image": face, "extra_face_images": [face]}, {}, str(number)) for number in (1, 2)]
    photos = cluster._Photos(ray)
    travelled = [photos.row(row) for row in rows]
    assert len(photos.refs) == 1 and all(set(refs) == {0} for _, refs in travelled)
    assert travelled[0][0].values == {"face_image": cluster._Photo(0), "extra_face_images": [cluster._Photo(0)]}
    assert np.array_equal(np.asarray(ray.get(photos.refs[0])), np.asarray(face))
