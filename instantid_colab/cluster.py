"""`batch --ray` and `bench --ray`: rows made on a Ray cluster, beyond one machine.

Ray (an optional extra: `pip install "instantid-colab[ray]"`) because it is the maintained engine for exactly this:
actors that keep a loaded model per GPU, a worker lost with its process or node noticed and replaced, clusters on any
cloud or Kubernetes (KubeRay). What is ours is what a batch means: one Ray actor per GPU loads the pipeline once and
makes rows (`batch.make_row`, as one process does); this process alone writes `results.jsonl` and the pictures (one
writer: resume works as for one process, and nothing is made twice); each photo goes into the object store once;
a row whose worker died is given to another worker, and recorded as failed after `MAX_ATTEMPTS` deaths.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from instantid_colab import batch
from instantid_colab.images import open_image
from instantid_colab.png_metadata import png_bytes
from instantid_colab.settings import SettingsError
from instantid_colab.weights import SMOKE_LABEL
from instantid_colab.weights_request import WeightsRequest

RAY_EXTRA = 'pip install "instantid-colab[ray]"'
LOCAL = "local"  # `--ray` without an address: a Ray started here, on this machine's GPUs (or CPUs)
IN_FLIGHT = 2  # rows handed to each worker at once, each on a thread of its own: while one row's pictures are
# encoded as PNG (0.16 s for 1024x1024 on a CPU core) the next is already on the GPU, as a one-process batch writes
# its PNGs from a background thread. Measured on one H100 before this overlap: Ray 0.466 images/s, one process 0.528.
MAX_ATTEMPTS = 3  # a row whose worker died this many times is recorded as failed, with why


def require_ray():
    """The ray module, or SettingsError (exit 2) saying how to get it: it is an optional extra."""
    try:
        import ray
    except ImportError:
        raise SettingsError([f"--ray needs Ray, an optional extra not installed here: {RAY_EXTRA} (on every machine "
                             "of the cluster)"]) from None
    return ray


@dataclasses.dataclass(frozen=True)
class _Photo:
    """Where a photo stood in a row, by its place in the object store's list (sent once, not once per row)."""

    index: int


def _swap_photos(value: Any, swap: Callable[[Any], Any]) -> Any:
    """`value` with every picture (PIL image or `_Photo`) replaced by `swap(picture)`, through the dicts, lists,
    tuples and dataclasses a row's values hold (people, controls)."""
    if isinstance(value, (Image.Image, _Photo)):
        return swap(value)
    if isinstance(value, dict):
        return {key: _swap_photos(item, swap) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_swap_photos(item, swap) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{field.name: _swap_photos(getattr(value, field.name), swap)
                                             for field in dataclasses.fields(value) if field.init})
    return value


class RowMaker:
    """A Ray actor's body: one loaded pipeline that makes rows, and for a benchmark scores them (`bench.run.Scorer`).
    Runs `IN_FLIGHT` calls at once on threads; one at a time holds the pipeline (`self.gpu`)."""

    def __init__(self, weights: WeightsRequest, run: str, worker: int, bench=None, bench_photos: dict | None = None):
        import ray

        from instantid_colab import pipeline

        self.run, self.worker, self.gpu = run, worker, threading.Lock()
        self.session = pipeline.load_pipeline(weights.resolve(progress=False), progress=False)
        self.scorer = None
        if bench is not None:
            from instantid_colab.bench.run import Scorer

            photos = dict(zip(bench_photos, ray.get(list(bench_photos.values()))))
            self.scorer = Scorer(self.session, bench, lambda path, what: photos[str(path)])

    def where(self) -> dict[str, Any]:
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "device": str(self.session.device)}

    def calibration(self) -> dict[str, Any]:
        return self.scorer.calibration()

    def make(self, row: batch.Row, photos: dict[int, Any]) -> dict[str, Any]:
        """The row's results line, its pictures as PNG bytes, and (a benchmark) how long loading its setting took
        here when this was its first row here."""
        import ray

        opened = dict(zip(photos, ray.get(list(photos.values()))))
        row = dataclasses.replace(row, values=_swap_photos(row.values, lambda photo: opened[photo.index]))
        with self.gpu:
            load = self.scorer.warm_up(row) if self.scorer else None
            line, result = batch.make_row(self.session, row, run=self.run, process=self.worker,
                                          measure=self.scorer.measure if self.scorer else None)
        return {"line": line, "pngs": [png_bytes(image) for image in result.images] if result else [], "load": load}


class _Photos:
    """Each distinct photo of the rows in the object store once; rows carry `_Photo` places instead."""

    def __init__(self, ray):
        self.ray, self.refs, self.places = ray, [], {}

    def place(self, image) -> _Photo:
        if id(image) not in self.places:
            self.places[id(image)] = (_Photo(len(self.refs)), image)  # the image kept: its id stays its own
            self.refs.append(self.ray.put(image))
        return self.places[id(image)][0]

    def row(self, row: batch.Row) -> tuple[batch.Row, dict[int, Any]]:
        """The row as it travels (places, not pictures) and the object refs of its photos."""
        used: list[_Photo] = []
        values = _swap_photos(row.values, lambda image: used.append(self.place(image)) or used[-1])
        return dataclasses.replace(row, values=values), {photo.index: self.refs[photo.index] for photo in used}


def connect(address: str | None):
    """Ray for this run: the running instance of this process, else a Ray started here (`LOCAL`), else the cluster
    at `address` (`auto`, `ray://HOST:10001`). Returns (ray, whether this run started it and stops it)."""
    ray = require_ray()
    if ray.is_initialized():
        return ray, False
    ray.init(address=None if address in (None, LOCAL) else address, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    return ray, True


def run_rows(rows: list[batch.Row], out: str | Path, weights: WeightsRequest, address: str | None = LOCAL,
             workers: int | None = None, bench=None, progress: bool = True, desc: str = "batch",
             on_row: Callable[[batch.Row, dict], None] | None = None) -> batch.BatchReport:
    """Make every row `out/results.jsonl` lacks on Ray workers: one per GPU of the cluster (`workers`: how many;
    without GPUs, that many CPU workers, 1 by default). `bench`: a BenchPlan whose rows these are (each worker
    scores its pictures; this process writes calibration.json and loads.jsonl)."""
    from tqdm.auto import tqdm

    ray, started_here = connect(address)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    claims = batch.Claims(out)  # its run id, and the lock the one writer writes under
    done = batch.done_keys(out)
    queue = collections.deque(row for row in rows if row.key not in done)
    taken = batch.pictures_of_others(out, rows)
    photos = _Photos(ray)
    bench_photos = None if bench is None else {
        str(path): ray.put(open_image(path, "face photo"))
        for person in bench.people for path in (*person.references, *([person.held_out] if person.held_out else []))}
    light_bench = None if bench is None else dataclasses.replace(bench, rows=[])  # its rows travel one by one
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = workers or gpus or 1
    maker = ray.remote(max_concurrency=IN_FLIGHT, **({"num_gpus": 1} if gpus else {"num_cpus": 1}))(RowMaker)
    spawned = 0

    def spawn():
        nonlocal spawned
        spawned += 1
        return maker.remote(weights, claims.run, spawned - 1, light_bench, bench_photos)

    makers = [spawn() for _ in range(count)]
    pending: dict[Any, tuple[batch.Row, Any]] = {}

    def hand(worker) -> None:
        if queue:
            row = queue.popleft()
            travelling, refs = photos.row(row)
            pending[worker.make.remote(travelling, refs)] = (row, worker)

    if bench is not None and queue:
        from instantid_colab.bench.run import write_calibration

        write_calibration(out, ray.get(makers[0].calibration.remote()))
    for worker in makers:
        for _ in range(IN_FLIGHT):
            hand(worker)
    bar = tqdm(total=len(queue) + len(pending), desc=f"{desc} (Ray, {count} workers)", unit="row",
               disable=not progress)
    made = failed = retried = 0
    deaths: collections.Counter[str] = collections.Counter()
    began = time.perf_counter()
    try:
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            row, worker = pending.pop(ready)
            try:
                answer = ray.get(ready)
            except ray.exceptions.RayActorError as error:  # its process or node is gone: the row goes to another
                deaths[row.key] += 1
                if deaths[row.key] < MAX_ATTEMPTS:
                    queue.appendleft(row)
                    retried += 1
                else:
                    claims.finish(row, {"key": row.key, "row": row.number, "asked": row.record, "run": claims.run,
                                        "status": "failed", "error": f"the Ray worker making it died {MAX_ATTEMPTS} "
                                        f"times (last: {str(error).splitlines()[0][:200]})"})
                    failed += 1
                    bar.update()
                if worker in makers:
                    makers[makers.index(worker)] = replacement = spawn()
                    for _ in range(IN_FLIGHT):
                        hand(replacement)
                continue
            line = answer["line"]
            if answer["load"] is not None:
                from instantid_colab.bench.run import record_load

                record_load(out, row.record["configuration"], answer["load"], f"ray-{line['process']}")
            if line["status"] == "done":
                batch.write_row(claims, row, line, answer["pngs"], out, taken)
                made += 1
            else:
                claims.finish(row, line)
                failed += 1
            bar.update()
            if on_row is not None:
                on_row(row, line)
            hand(worker)
    finally:
        bar.close()
        for worker in makers:
            ray.kill(worker)
        if started_here:
            ray.shutdown()
    sheet = None
    if bench is None:
        with claims.locked():
            sheet = batch.contact_sheet(out, rows, SMOKE_LABEL if weights.smoke else None)
    return batch.BatchReport(len(rows), made, len(rows) - len({row.key for row in rows} - done), failed,
                             time.perf_counter() - began, out, sheet, retried)
