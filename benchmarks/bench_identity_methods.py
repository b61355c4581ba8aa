"""What each identity method costs beside InstantID on the same loaded SDXL, side by side in one process.

    python3 benchmarks/bench_identity_methods.py --out OUT [--methods instantid,faceid-plusv2,pulid] [--speeds 10sm]
                                                 [--steps 30] [--rounds 3] [--in-a-row 20] [--placement model_offload]

The plan and memory cap of a free T4 (14.75 GiB), 1024x1024, guidance 5, random full-size weights (smoke: random
weights): SDXL, the IdentityNet and InstantID's adapter as bench_generate writes them; FaceID Plus V2's adapter with
every key and shape of the real file (LoRA rank 128) and CLIP ViT-H/14 at its real sizes; PuLID v1.1's adapter
(IDFormer and the ID attention layers) with every key and shape of pulid_v1.1.safetensors, EVA02-CLIP-L-14-336 and
the SegFormer-B5 face parser at their real sizes. Reported: each method's first load (files to modules), s/image of
each method alternating over `--rounds` (equal steps), peak VRAM allocated per method, what switching costs (the
processors swapped in and out), and host RSS over `--in-a-row` pictures of each method (the failure PuLID's Colab
notebook has). `--placement`: a lighter plan than the T4's (as an out-of-memory retry steps down to it), to see the
methods under CPU offload. The pictures are noise; time and memory are real.
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

from instantid_colab.engines import IDENTITIES  # noqa: E402

def prepare(root: Path) -> None:
    """Each method's files at their real sizes for the full-size UNet (shapes read from a UNet without memory): its
    smoke module's `write_full_size` (`instantid_colab.smoke.<method module>`)."""
    import importlib

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from instantid_colab import engines

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(root / "base"), subfolder="unet"))
    for name in ARGS.methods.split(","):
        method = engines.method(name)
        done = root / "identity" / f"{name}.done"
        if method.download_gb and not done.is_file():
            importlib.import_module(method.module.replace(".engines.", ".smoke.")).write_full_size(root, unet)
            done.write_text("")


def measure(speed: str) -> dict:
    import psutil
    import torch

    from bench_generate import T4_RAM_GIB, T4_VRAM_GIB
    from bench_speed import _enter_speed, _weights
    from instantid_colab import engines, memory, pipeline, smoke

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
        pipeline.generate(session, photo, engines.method(identity).prompt_for("a portrait photo of a person in a garden"),
                          identity=identity, steps=steps, width=1024, height=1024, seed=1)
        torch.cuda.synchronize()
        return time.perf_counter() - started, torch.cuda.max_memory_allocated() / 2**30

    methods = ARGS.methods.split(",")
    others = [method for method in methods if method != "instantid"]
    make("instantid", 2)
    load_seconds, switch_ms, rss = {}, {}, {}
    for method in others:
        started = time.perf_counter()
        session.identity_engine(method)
        load_seconds[method] = time.perf_counter() - started
        make(method, 2)
    seconds = {method: [] for method in methods}
    peaks = {method: 0.0 for method in methods}
    for _ in range(ARGS.rounds):
        for method in methods:
            spent, peak = make(method, ARGS.steps)
            seconds[method].append(spent)
            peaks[method] = max(peaks[method], peak)
        print(json.dumps({method: values[-1] for method, values in seconds.items()}), flush=True)
    process = psutil.Process()
    for method in others:
        engine = session.identity_engine(method)
        started = time.perf_counter()
        for _ in range(10):  # the method's layers in and InstantID's back, as every call of it does
            with engine.installed(session.pipe.unet):
                pass
        switch_ms[method] = (time.perf_counter() - started) / 10 * 1000
        rss[method] = [process.memory_info().rss / 2**30]
        for _ in range(ARGS.in_a_row):
            make(method, 4)
            rss[method].append(process.memory_info().rss / 2**30)
    return {"speed": speed, "device": torch.cuda.get_device_name(0), "plan": session.plan.placement,
            "steps": ARGS.steps, "load_seconds": load_seconds, "switch_ms": switch_ms,
            "seconds": seconds, "median_seconds": {m: statistics.median(v) for m, v in seconds.items()},
            "peak_allocated_gib": peaks, "rss_gib": rss, "label": smoke.SMOKE_LABEL}


ARGS: argparse.Namespace


def main() -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default=",".join(IDENTITIES), help="instantid first: the others are compared "
                        "with it")
    parser.add_argument("--speeds", default="10sm")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-a-row", type=int, default=20)
    parser.add_argument("--placement", help="a lighter memory plan than the T4's, e.g. model_offload")
    parser.add_argument("--weights", default="/tmp/bench_weights")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    ARGS = parser.parse_args()
    from bench_speed import per_speed

    methods = ARGS.methods.split(",")
    if methods[0] != "instantid" or not set(methods) <= set(IDENTITIES):
        parser.error(f"--methods: instantid first, then any of {', '.join(IDENTITIES[1:])}")
    results = per_speed(__file__, ARGS, "bench_identity_methods", measure, prepare=prepare)
    if results is None:
        return 0
    print("| speed | plan | method | s/image (median) | x InstantID | peak VRAM allocated (GiB) |")
    print("|---|---|---|---|---|---|")
    for result in results:
        base = result["median_seconds"]["instantid"]
        for method in result["median_seconds"]:
            print(f"| {result['speed']} | {result['plan']} | {method} | {result['median_seconds'][method]:.2f} | "
                  f"{result['median_seconds'][method] / base:.2f} | {result['peak_allocated_gib'][method]:.2f} |")
        for method, rss in result["rss_gib"].items():
            print(f"{result['speed']} {method}: first load {result['load_seconds'][method]:.1f} s; a switch "
                  f"{result['switch_ms'][method]:.2f} ms; RSS over {len(rss) - 1} pictures in a row {rss[0]:.3f} -> "
                  f"{rss[-1]:.3f} GiB (after the first: {rss[1]:.3f}, highest {max(rss):.3f})")
    (Path(ARGS.out) / "bench_identity_methods.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
