"""The refine pass and face swap on the free-T4 budget: seconds and peak memory.

    python3 benchmarks/bench_refine.py --out OUT [--speeds full,10sm] [--steps 30]

Random full-size weights (smoke: random weights) in the real layout (bench_generate.py). One process per speed
(`10sm`: a CUDA green context of 10 streaming multiprocessors, GPU-bound like a T4; `full`: the whole GPU),
capped at 14.75 GiB, the plan a free T4 gets. Random weights draw no face, so the refine pass runs on a picture
with a face the smoke detector finds, in place of the generated one (what it costs does not depend on what the
face looks like): (1) a 1024x1024 image at `--steps`, (2) its refine pass at strength 0.4 (one face), (3) a swap
into a 4000x3000 photo at strength 0.7 with the same steps. Median of `--images` after a warm-up; peak VRAM
reserved and host RssAnon per stage.
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

GIB = 2**30
PROMPT = "a full-body photo of a person in a garden"


def face_picture(size: tuple[int, int], side: int):
    """A dark picture with one bright square "face" (what the smoke detector finds), centred in the upper half."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", size, (24, 22, 30))
    left, top = (size[0] - side) // 2, size[1] // 3 - side // 2
    ImageDraw.Draw(picture).rectangle([left, top, left + side - 1, top + side - 1], fill=(235, 200, 175))
    return picture


def run_speed(speed: str, args) -> dict:
    import torch

    from bench_generate import T4_RAM_GIB, T4_VRAM_GIB
    from bench_speed import _enter_speed, _weights
    from instantid_colab import memory, pipeline, refine, smoke

    _enter_speed(speed)
    session = pipeline.load_pipeline(_weights(Path(args.weights)), memory.choose_plan(T4_RAM_GIB, T4_VRAM_GIB),
                                     progress=False)
    face = smoke.sample_face_image(512)
    made = face_picture((1024, 1024), 205)  # a fifth of the side: the smoke detector's face size
    target = face_picture((4000, 3000), 800)
    stages = {"image": [], "refine": [], "swap": []}
    peaks = {}
    for name in stages:
        recorder = memory.StageRecorder(log=lambda row: None)
        torch.cuda.reset_peak_memory_stats()
        with recorder.stage(name):
            for seed in range(args.images + 1):
                started = time.perf_counter()
                if name == "image":
                    pipeline.generate(session, face, PROMPT, seed=seed, steps=args.steps, width=1024, height=1024)
                elif name == "refine":
                    result = pipeline.generate(session, face, PROMPT, seed=seed, steps=1, width=1024, height=1024)
                    result.images[0] = made.copy()
                    result.settings["steps"] = args.steps  # the pass repaints 0.4 of the image's own steps
                    started = time.perf_counter()  # the refine pass alone
                    refine.refine_faces(session, result, 0.4, face_image=face)
                    assert result.refined[0]["faces"] == 1, result.refined
                else:
                    refine.swap(session, target, face, strength=0.7, seed=seed, steps=args.steps)
                stages[name].append(time.perf_counter() - started)
        peaks[name] = {"vram_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
                       "rss_anon_gib": recorder.records[0].rss_anon_peak_gib}
    return {"speed": speed, "steps": args.steps, "device": torch.cuda.get_device_name(0), "label": smoke.SMOKE_LABEL,
            "seconds": {name: statistics.median(times[1:]) for name, times in stages.items()}, "times": stages,
            "peaks": peaks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--speeds", default="full,10sm")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=1, help="timed images after one warm-up")
    parser.add_argument("--weights", default="/tmp/bench_weights")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from bench_speed import per_speed

    results = per_speed(__file__, args, "refine", lambda speed: run_speed(speed, args))
    if results is None:
        return 0
    print("| speed | what | s | × the image | peak VRAM reserved GiB | peak host RssAnon GiB |")
    print("|---|---|---|---|---|---|")
    for result in results:
        image = result["seconds"]["image"]
        for name, what in (("image", f"1024x1024, {result['steps']} steps"), ("refine", "refine pass, strength 0.4"),
                           ("swap", "swap into 4000x3000, strength 0.7")):
            peak = result["peaks"][name]
            print(f"| {result['speed']} | {what} | {result['seconds'][name]:.2f} | {result['seconds'][name] / image:.2f} | "
                  f"{peak['vram_reserved_gib']:.2f} | {peak['rss_anon_gib']:.2f} |")
    (Path(args.out) / "bench_refine.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
