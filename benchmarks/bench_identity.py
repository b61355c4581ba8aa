"""What an identity benchmark costs: the notebook's default grid (the seven speed modes at their own settings)
through `bench.run`, on random full-size weights with the plan and the memory cap of a free T4.

    python3 benchmarks/bench_identity.py --out OUT [--speeds 10sm] [--seeds 1]

Two drawn people (one with a held-out photo) x PuLID's protocol prompt x 7 settings x `--seeds` images, 1024x1024.
Reported: s/image per setting (generation, from results.jsonl: the first image of each fast mode includes loading
its LoRA, so the median is given too), peak VRAM per setting and over the whole run (the judges included), what
the judges add per image (face detection, SFace, CLIP ViT-L/14 in fp16 beside the pipeline), and the run's wall
time. CLIP is CLIP-L at its real sizes with random weights; SFace is the tiny stand-in of the smoke weights (the
real one, a 37 MB MobileFaceNet, runs on the CPU through OpenCV and is not timed here); the few-step LoRAs are one
random rank-64 LoRA (bench_speed_modes.py). The weights are random (smoke: random weights): the pictures are noise
and hold no face, so the likeness figures are empty; time and memory are real.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GRID = "speed=quality,lcm,lightning-4,lightning-8,hyper-8,dmd2-4,tcd"  # notebook 05's default


def prepare(root: Path) -> None:
    """The speed modes' stand-in LoRA and TAESDXL, CLIP-L at its real sizes and the SFace stand-in as judges."""
    import torch

    from bench_speed_modes import write_speed_files
    from instantid_colab.bench.judges import CLIP_REPO, SFACE_FILE, SFACE_REPO
    from instantid_colab.smoke.judges import CLIP_L, write_clip, write_sface

    write_speed_files(root)
    judges = root / "judges"
    if not (judges / "done").is_file():
        write_clip(judges / CLIP_REPO.replace("/", "--"), CLIP_L, dtype=torch.float16, shared_bias=None)
        write_sface(judges / SFACE_REPO.replace("/", "--") / SFACE_FILE)
        (judges / "done").write_text("")


def measure(speed: str) -> dict:
    import torch

    from bench_generate import T4_RAM_GIB, T4_VRAM_GIB
    from bench_speed import _enter_speed, _weights
    from instantid_colab import batch, memory, pipeline, smoke
    from instantid_colab.bench import run as bench
    from instantid_colab.bench.judges import load_judges

    _enter_speed(speed)
    session = pipeline.load_pipeline(_weights(Path(ARGS.weights)), memory.choose_plan(T4_RAM_GIB, T4_VRAM_GIB),
                                     progress=False)
    out = Path(ARGS.out) / f"run_{speed}"
    plan = bench.plan(smoke.write_sample_people(out / "people"), "protocol", GRID, ARGS.seeds)
    started = time.perf_counter()
    made, summary, _ = bench.run(session, plan, out, progress=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    run_peak = torch.cuda.max_memory_allocated() / 2**30
    lines = [line for line in batch.results(out) if line.get("status") == "done"]
    judges = load_judges(session.weights, session.device, on_gpu=True)
    targets = bench.references(session, judges, plan.people)
    images = [line["files"][0] for line in lines[:6]]
    judged, clip = [], []
    for file in images:
        started = time.perf_counter()
        bench.measure(session, judges, targets["bob"], file, "portrait")
        judged.append(time.perf_counter() - started)
        started = time.perf_counter()
        judges.clip.score(file, "portrait")
        clip.append(time.perf_counter() - started)
    settings = []
    for setting in summary.settings:
        seconds = [line["seconds"] for line in lines if line["asked"]["configuration"] == setting.name]
        settings.append({"setting": setting.name, "images": setting.images, "seconds_mean": statistics.fmean(seconds),
                         "seconds_median": statistics.median(seconds), "seconds": seconds,
                         "peak_vram_gib": setting.peak_vram_gib})
        print(json.dumps(settings[-1]), flush=True)
    return {"speed": speed, "device": torch.cuda.get_device_name(0), "images": len(lines), "made": made.made,
            "wall_seconds": wall, "run_peak_allocated_gib": run_peak, "judges_seconds_per_image": statistics.median(judged),
            "clip_seconds_per_image": statistics.median(clip), "settings": settings, "label": smoke.SMOKE_LABEL}


ARGS: argparse.Namespace


def main() -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--speeds", default="10sm")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--weights", default="/tmp/bench_weights")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    ARGS = parser.parse_args()
    from bench_speed import per_speed

    results = per_speed(__file__, ARGS, "bench_identity", measure, prepare=prepare)
    if results is None:
        return 0
    print("| speed | setting | images | s/image mean | s/image median | peak VRAM allocated (GiB) |")
    print("|---|---|---|---|---|---|")
    for result in results:
        for row in result["settings"]:
            print(f"| {result['speed']} | {row['setting']} | {row['images']} | {row['seconds_mean']:.2f} | "
                  f"{row['seconds_median']:.2f} | {row['peak_vram_gib']:.2f} |")
        print(f"\n{result['speed']}: {result['images']} images in {result['wall_seconds']:.0f} s (loading LoRAs and "
              f"judges included); judges {result['judges_seconds_per_image']:.2f} s/image (CLIP "
              f"{result['clip_seconds_per_image']:.3f} s); peak allocated over the run "
              f"{result['run_peak_allocated_gib']:.2f} GiB")
    (Path(ARGS.out) / "bench_identity.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
