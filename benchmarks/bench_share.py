"""A share link under load: the served app (gradio, the real server) with random full-size weights, the T4 plan and
memory cap, 10 SMs, driven by gradio_client the way people on one link use it.

    python3 benchmarks/bench_share.py --out OUT [--clients 8] [--steps 10] [--in-a-row 30]

Phase 1: `--clients` people press Generate at once (1024x1024, `--steps` Euler steps with CFG); per person the
seconds from the click to the picture, the seconds their picture took to make (the settings panel's), and the
difference: the wait in line. Phase 2: `--in-a-row` pictures one after the other (4 steps). All along, every 0.5 s:
the server's resident memory, the GPU memory allocated and reserved, and how many pictures are in line. The weights
are random (smoke: random weights): the pictures are noise; time and memory are real.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


class Sampler(threading.Thread):
    """Every 0.5 s: seconds since start, resident memory (GiB), GPU allocated/reserved (GiB), runs in line."""

    def __init__(self, line):
        super().__init__(daemon=True)
        self.line, self.rows, self.running = line, [], True
        self.started = time.monotonic()

    def run(self) -> None:
        import psutil
        import torch

        process = psutil.Process()
        while self.running:
            self.rows.append([round(time.monotonic() - self.started, 1), round(process.memory_info().rss / 2**30, 3),
                              round(torch.cuda.memory_allocated() / 2**30, 3),
                              round(torch.cuda.memory_reserved() / 2**30, 3), len(self.line)])
            time.sleep(0.5)


def measure(speed: str) -> dict:
    import torch
    from gradio_client import Client, handle_file

    from bench_generate import T4_RAM_GIB, T4_VRAM_GIB
    from bench_speed import _enter_speed, _weights
    from instantid_colab import app, memory, pipeline, smoke

    _enter_speed(speed)
    session = pipeline.load_pipeline(_weights(Path(ARGS.weights)), memory.choose_plan(T4_RAM_GIB, T4_VRAM_GIB),
                                     progress=False)
    face = Path(ARGS.out) / "face.png"
    smoke.sample_face_image(512).save(face)
    line = app.GpuLine()
    launched = app.launch(session, share=False, block=False, line=line)
    sampler = Sampler(line)
    sampler.start()
    clients = [Client(launched.local_url, verbose=False) for _ in range(ARGS.clients)]
    Client(launched.local_url, verbose=False).predict(face_path=handle_file(str(face)), steps=2, size="1024x1024",
                                                      api_name="/generate")  # warm-up, outside the figures
    people = []

    def person(index: int, client) -> None:
        clicked = time.monotonic()
        result = client.predict(face_path=handle_file(str(face)), seed=index, randomize_seed=False, steps=ARGS.steps,
                                size="1024x1024", api_name="/generate")
        total = time.monotonic() - clicked
        made = float(re.search(r"· ([\d.]+) s", result[2]).group(1))
        people.append({"person": index, "seed": result[1], "click_to_picture_s": round(total, 2),
                       "making_s": made, "waiting_s": round(total - made, 2)})

    burst_started = time.monotonic() - sampler.started
    threads = [threading.Thread(target=person, args=(index, client)) for index, client in enumerate(clients)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    row_started = time.monotonic() - sampler.started
    in_a_row = []
    for seed in range(ARGS.in_a_row):
        started = time.monotonic()
        clients[0].predict(face_path=handle_file(str(face)), seed=seed, randomize_seed=False, steps=4,
                           size="1024x1024", api_name="/generate")
        in_a_row.append(round(time.monotonic() - started, 2))
    sampler.running = False
    sampler.join()
    launched.app.close()
    samples = sampler.rows
    after_ten = next(rss for t, rss, *_ in samples if t >= row_started + sum(in_a_row[:10]))
    return {"speed": speed, "device": torch.cuda.get_device_name(0), "clients": ARGS.clients, "steps": ARGS.steps,
            "people": sorted(people, key=lambda p: p["click_to_picture_s"]), "burst_started_s": burst_started,
            "in_a_row_started_s": row_started, "in_a_row_s": in_a_row, "rss_after_ten_gib": after_ten,
            "rss_end_gib": samples[-1][1], "peak_rss_gib": max(s[1] for s in samples),
            "peak_allocated_gib": max(s[2] for s in samples), "peak_reserved_gib": max(s[3] for s in samples),
            "samples": samples, "label": smoke.SMOKE_LABEL}


ARGS: argparse.Namespace


def main() -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--speeds", default="10sm")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--in-a-row", type=int, default=30)
    parser.add_argument("--weights", default="/tmp/bench_weights")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    ARGS = parser.parse_args()
    from bench_speed import per_speed

    results = per_speed(__file__, ARGS, "bench_share", measure)
    if results is None:
        return 0
    for result in results:
        print(f"{result['speed']}: {result['clients']} people at once, {result['steps']} steps, 1024x1024")
        print("| person (by finish) | seed | click to picture (s) | making (s) | waiting in line (s) |")
        print("|---|---|---|---|---|")
        for person in result["people"]:
            print(f"| {person['person']} | {person['seed']} | {person['click_to_picture_s']:.1f} | "
                  f"{person['making_s']:.1f} | {person['waiting_s']:.1f} |")
        print(f"then {len(result['in_a_row_s'])} in a row: median {statistics.median(result['in_a_row_s']):.2f} s; "
              f"resident memory {result['rss_after_ten_gib']:.3f} GiB after ten, {result['rss_end_gib']:.3f} at the end, "
              f"peak {result['peak_rss_gib']:.3f}; GPU peak allocated {result['peak_allocated_gib']:.2f} GiB, "
              f"reserved {result['peak_reserved_gib']:.2f}")
        print("memory over time (s, RSS GiB, allocated GiB, reserved GiB, in line), every 5 s:")
        for sample in result["samples"][::10]:
            print("  ", sample)
    (Path(ARGS.out) / "bench_share.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
