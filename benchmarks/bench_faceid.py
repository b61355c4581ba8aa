"""What IP-Adapter FaceID Plus V2 costs beside InstantID on the same loaded SDXL, side by side in one process.

    python3 benchmarks/bench_faceid.py --out OUT [--speeds 10sm] [--steps 30] [--rounds 3] [--in-a-row 20]
                                       [--placement model_offload]

The plan and memory cap of a free T4 (14.75 GiB), 1024x1024, guidance 5, random full-size weights (smoke: random
weights): SDXL, the IdentityNet and InstantID's adapter as bench_generate writes them, FaceID Plus V2's adapter with
every key and shape of the real file (LoRA rank 128) and CLIP ViT-H/14 at its real sizes. Reported: the first FaceID
load (files to modules), s/image of each method alternating over `--rounds` (equal steps), peak VRAM allocated per
method, what switching costs (the processors swapped in and out), and host RSS over `--in-a-row` FaceID pictures
(the failure PuLID's Colab notebook has). `--placement`: a lighter plan than the T4's (as an out-of-memory retry
steps down to it), to see the method under CPU offload. The pictures are noise; time and memory are real.
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

METHODS = ("instantid", "faceid-plusv2")


def prepare(root: Path) -> None:
    """FaceID's three files at their real sizes for the full-size UNet (shapes read from a UNet without memory)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from instantid_colab.smoke.faceid import VIT_H, write_faceid

    if (root / "identity" / "done").is_file():
        return
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(root / "base"), subfolder="unet"))
    write_faceid(root, unet, VIT_H, rank=128, dtype=torch.float16)
    (root / "identity" / "done").write_text("")


def measure(speed: str) -> dict:
    import psutil
    import torch

    from bench_generate import T4_RAM_GIB, T4_VRAM_GIB
    from bench_speed import _enter_speed, _weights
    from instantid_colab import memory, pipeline, smoke

    _enter_speed(speed)
    plan = memory.choose_plan(T4_RAM_GIB, T4_VRAM_GIB)
    while ARGS.placement and plan.placement != ARGS.placement:
        plan = memory.step_down(plan)
        if plan is None:
            raise SystemExit(f"no plan with placement {ARGS.placement} below the T4's")
    session = pipeline.load_pipeline(_weights(Path(ARGS.weights)), plan, progress=False)
    photo = smoke.sample_face_image(512)

    def make(identity: str, steps: int) -> tuple[float, float]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        pipeline.generate(session, photo, "a portrait photo of a person in a garden", identity=identity, steps=steps,
                          width=1024, height=1024, seed=1)
        torch.cuda.synchronize()
        return time.perf_counter() - started, torch.cuda.max_memory_allocated() / 2**30

    make("instantid", 2)
    started = time.perf_counter()
    engine = session.faceid()
    load_seconds = time.perf_counter() - started
    make("faceid-plusv2", 2)
    seconds = {method: [] for method in METHODS}
    peaks = {method: 0.0 for method in METHODS}
    for _ in range(ARGS.rounds):
        for method in METHODS:
            spent, peak = make(method, ARGS.steps)
            seconds[method].append(spent)
            peaks[method] = max(peaks[method], peak)
        print(json.dumps({method: values[-1] for method, values in seconds.items()}), flush=True)
    started = time.perf_counter()
    for _ in range(10):
        with engine.installed(session.pipe.unet, 0.8):
            pass
    switch_ms = (time.perf_counter() - started) / 10 * 1000
    process = psutil.Process()
    rss = [process.memory_info().rss / 2**30]
    for _ in range(ARGS.in_a_row):
        make("faceid-plusv2", 4)
        rss.append(process.memory_info().rss / 2**30)
    return {"speed": speed, "device": torch.cuda.get_device_name(0), "plan": session.plan.placement,
            "steps": ARGS.steps, "faceid_load_seconds": load_seconds, "switch_ms": switch_ms,
            "seconds": seconds, "median_seconds": {m: statistics.median(v) for m, v in seconds.items()},
            "peak_allocated_gib": peaks, "rss_gib": rss, "label": smoke.SMOKE_LABEL}


ARGS: argparse.Namespace


def main() -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--speeds", default="10sm")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-a-row", type=int, default=20)
    parser.add_argument("--placement", help="a lighter memory plan than the T4's, e.g. model_offload")
    parser.add_argument("--weights", default="/tmp/bench_weights")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    ARGS = parser.parse_args()
    from bench_speed import per_speed

    results = per_speed(__file__, ARGS, "bench_faceid", measure, prepare=prepare)
    if results is None:
        return 0
    print("| speed | plan | method | s/image (median) | x InstantID | peak VRAM allocated (GiB) |")
    print("|---|---|---|---|---|---|")
    for result in results:
        base = result["median_seconds"]["instantid"]
        for method in METHODS:
            print(f"| {result['speed']} | {result['plan']} | {method} | {result['median_seconds'][method]:.2f} | "
                  f"{result['median_seconds'][method] / base:.2f} | {result['peak_allocated_gib'][method]:.2f} |")
        rss = result["rss_gib"]
        print(f"\n{result['speed']}: first FaceID load {result['faceid_load_seconds']:.1f} s; a switch "
              f"{result['switch_ms']:.2f} ms; RSS over {len(rss) - 1} FaceID pictures in a row {rss[0]:.3f} -> "
              f"{rss[-1]:.3f} GiB (after the first: {rss[1]:.3f})")
    (Path(ARGS.out) / "bench_faceid.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
