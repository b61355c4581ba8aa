"""Batch throughput on one and on several GPUs: the batch command's code, random full-size weights.

    python3 benchmarks/bench_batch.py --out OUT [--gpus 1,2] [--rows 16] [--steps 10] [--ray]

Writes a manifest of `--rows` rows (one face photo, different prompts and seeds, 1024x1024) and runs
`batch.run` on it once per entry of `--gpus`: one process, then `accelerate launch --multi_gpu` with
N processes, each loading its own pipeline on its own GPU with its own memory plan, all taking rows
from the same manifest and writing one results.jsonl. Reported: images per second between the first
row taken and the last row written (loading excluded), the end-to-end seconds, rows per process, and
that every row is in results.jsonl exactly once. `--ray`: each GPU count also through `batch --ray`'s code (a Ray
started on this machine, one worker per GPU, this process writing), side by side with the one above. Random weights (smoke: random weights): the pictures
mean nothing, the throughput is real.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def worker(args) -> None:
    """One process: its GPU, its plan, its pipeline, rows from the shared manifest."""
    import torch

    from bench_speed import _weights
    from instantid_colab import batch, memory, pipeline

    process, processes = 0, 1
    if "LOCAL_RANK" in os.environ:
        from accelerate import PartialState

        state = PartialState()
        process, processes = state.process_index, state.num_processes
        if state.device.type == "cuda":
            torch.cuda.set_device(state.device)
    weights = _weights(Path(args.weights))
    session = pipeline.load_pipeline(weights, memory.plan_for_this_machine(), progress=False)
    rows = batch.prepare_rows(args.manifest, smoke=args.tiny)
    started = time.time()
    report = batch.run(session, rows, args.run_out, process=process, processes=processes, progress=False)
    Path(args.run_out, f"process-{process}-{os.getpid()}.json").write_text(json.dumps(
        {"process": process, "started": started, "ended": time.time(), "made": report.made,
         "device": str(session.device), "plan": session.plan.placement}))


def ray_driver(args) -> None:
    """A Ray run on this machine's first `--ray-gpus` GPUs: the rows made by one worker per GPU (`cluster.run_rows`);
    when each row reached this process, to time it as the one-process run is timed."""
    import ray

    from bench_speed import _weights
    from instantid_colab import batch, cluster
    from instantid_colab.weights_request import WeightsRequest

    ray.init(num_gpus=args.ray_gpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    rows = batch.prepare_rows(args.manifest, smoke=args.tiny)
    arrived = []
    report = cluster.run_rows(rows, args.run_out, WeightsRequest(paths=_weights(Path(args.weights))),
                              workers=args.ray_gpus, progress=False,
                              on_row=lambda row, line: arrived.append((time.time(), line)))
    first_seconds = arrived[0][1]["seconds"]
    for worker in sorted({line["process"] for _, line in arrived}):
        mine = [(at, line) for at, line in arrived if line["process"] == worker]
        Path(args.run_out, f"process-{worker}-ray.json").write_text(json.dumps(
            {"process": worker, "started": arrived[0][0] - first_seconds, "ended": mine[-1][0], "made": len(mine),
             "device": mine[0][1]["device"], "plan": "ray"}))
    ray.shutdown()
    assert report.made == len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for the manifest, the runs and bench_batch.json")
    parser.add_argument("--gpus", default="1,2")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--weights", default="/tmp/bench_weights")
    parser.add_argument("--tiny", action="store_true", help="smoke sizes on the CPU: checks the plumbing only")
    parser.add_argument("--ray", action="store_true", help="each GPU count through Ray too (needs the ray extra)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ray-gpus", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--run-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.ray_gpus:
        ray_driver(args)
        return 0
    if not args.out:
        parser.error("--out is required")

    from bench_generate import write_weights
    from instantid_colab import batch, smoke

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_weights(Path(args.weights), tiny=args.tiny)
    smoke.sample_face_image(512).save(out / "face.png")
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"face": "face.png", "prompt": f"portrait {row}", "seed": row,
                                            "steps": args.steps, "width": args.size, "height": args.size}) + "\n"
                                for row in range(args.rows)))
    summary = []
    runs = [(int(n), mode) for n in args.gpus.split(",") for mode in ("process", *(["ray"] if args.ray else []))]
    for gpus, mode in runs:
        run_out = out / f"gpus-{gpus}{'-ray' if mode == 'ray' else ''}"
        common = [str(Path(__file__)), "--manifest", str(manifest), "--run-out", str(run_out), "--weights",
                  args.weights] + (["--tiny"] if args.tiny else [])
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus)]
        command = ([sys.executable, *common, "--ray-gpus", str(gpus)] if mode == "ray" else
                   [sys.executable, *common, "--worker"] if gpus == 1 else [*launcher, *common, "--worker"])
        begun = time.time()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.time() - begun
        if done.returncode != 0:
            print(done.stderr[-4000:])
            summary.append({"gpus": gpus, "mode": mode, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        processes = [json.loads(path.read_text()) for path in sorted(run_out.glob("process-*.json"))]
        lines = batch.results(run_out)
        span = max(p["ended"] for p in processes) - min(p["started"] for p in processes)
        summary.append({"gpus": gpus, "mode": mode, "rows": len(lines), "distinct_rows": len({line["key"] for line in lines}),
                        "images_per_second": len(lines) / span, "batch_seconds": span, "end_to_end_seconds": wall,
                        "rows_per_process": {p["process"]: p["made"] for p in processes},
                        "devices": sorted({p["device"] for p in processes}), "plans": sorted({p["plan"] for p in processes})})
        print(json.dumps(summary[-1]), flush=True)
    ok = [s for s in summary if "error" not in s]
    base = next((s for s in ok if s["gpus"] == 1 and s["mode"] == "process"), None)
    print("| GPUs | how | rows (distinct) | images/s | speed-up | batch s | end-to-end s | x one process end to end | "
          "rows per process |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in ok:
        speedup = f"{s['images_per_second'] / base['images_per_second']:.2f}" if base else "-"
        wall = f"{s['end_to_end_seconds'] / base['end_to_end_seconds']:.3f}" if base else "-"
        print(f"| {s['gpus']} | {s['mode']} | {s['rows']} ({s['distinct_rows']}) | {s['images_per_second']:.3f} | "
              f"{speedup} | {s['batch_seconds']:.1f} | {s['end_to_end_seconds']:.1f} | {wall} | "
              f"{s['rows_per_process']} |")
    (out / "bench_batch.json").write_text(json.dumps(summary, indent=2))
    return 0 if len(ok) == len(summary) else 1


if __name__ == "__main__":
    sys.exit(main())
