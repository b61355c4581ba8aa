"""Several people in one picture on the free-T4 budget: seconds and peak memory for 1 to 4 people, and whether
one batched IdentityNet call for all people would beat one call per person.

    python3 benchmarks/bench_people.py --out OUT [--people 1,2,3,4] [--speeds full,10sm] [--steps 10]

Random full-size weights (smoke: random weights) in the real layout, written once by bench_generate.py.
One process per speed (`10sm`: a CUDA green context of 10 streaming multiprocessors, GPU-bound like a T4;
`full`: the whole GPU), capped at 14.75 GiB of VRAM, with the plan a free T4 gets (11 GiB RAM). In it,
for each count: 1 is the single-face path (`--face`), 2 to 4 the people path with the side-by-side layout;
1024x1024, CFG 5; s/image is the median of the timed images after one warm-up; peak VRAM reserved and peak
host RssAnon per count; the plan after the count (an out-of-memory step-down would show there).
Then the IdentityNet alone, at 1024x1024 with CFG (batch 2 per person): N calls of batch 2 (what the
pipeline does: one MultiControlNetModel slot per person) against one call of batch 2N, median ms per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GIB = 2**30
PROMPT = "a photo of friends in a garden"
COLOURS = ((235, 200, 175), (170, 200, 240), (240, 180, 200), (200, 235, 180))


def run_speed(speed: str, args) -> dict:
    import torch

    from bench_generate import T4_RAM_GIB, T4_VRAM_GIB
    from bench_speed import _enter_speed, _weights
    from instantid_colab import memory, pipeline, smoke
    from instantid_colab.people import Person

    _enter_speed(speed)
    session = pipeline.load_pipeline(_weights(Path(args.weights)), memory.choose_plan(T4_RAM_GIB, T4_VRAM_GIB),
                                     progress=False)
    photos = [smoke.sample_face_image(512, face_color=colour) for colour in COLOURS]
    rows = []
    for count in map(int, args.people.split(",")):
        recorder = memory.StageRecorder(log=lambda row: None)
        torch.cuda.reset_peak_memory_stats()
        times, notices = [], []
        with recorder.stage(f"{count} people"):
            for seed in range(args.images + 1):
                if count == 1:
                    result = pipeline.generate(session, photos[0], PROMPT, seed=seed, steps=args.steps, width=1024,
                                               height=1024)
                else:
                    result = pipeline.generate(session, prompt=PROMPT, people=[Person((photo,)) for photo in
                                                                               photos[:count]],
                                               seed=seed, steps=args.steps, width=1024, height=1024)
                times.append(result.seconds)
                notices += result.notices
        rows.append({"people": count, "seconds_per_image": statistics.median(times[1:]), "times": times,
                     "peak_vram_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
                     "peak_rss_anon_gib": recorder.records[0].rss_anon_peak_gib, "placement": session.plan.placement,
                     "notices": sorted(set(notices))})
        print(json.dumps(rows[-1]), flush=True)
    return {"speed": speed, "steps": args.steps, "device": torch.cuda.get_device_name(0), "rows": rows,
            "identitynet": identitynet_batching(session, args.reps), "label": "smoke: random weights"}


def identitynet_batching(session, reps: int, size: int = 1024) -> list[dict]:
    """ms per denoising step of the IdentityNet for N people: N calls of batch 2 against one of batch 2N."""
    import torch
    from diffusers import ControlNetModel

    net = session.pipe.controlnet
    dtype, device = next(net.parameters()).dtype, next(net.parameters()).device
    generator = torch.Generator(device).manual_seed(0)
    config = net.config
    text_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    def inputs(batch):
        return dict(sample=randn(batch, 4, size // 8, size // 8), timestep=torch.tensor(500.0, device=device),
                    encoder_hidden_states=randn(batch, 16, config.cross_attention_dim),
                    controlnet_cond=randn(batch, 3, size, size), conditioning_scale=0.8, return_dict=False,
                    added_cond_kwargs={"text_embeds": randn(batch, text_width), "time_ids": randn(batch, 6)})

    def milliseconds(calls) -> float:
        for _ in range(2):
            calls()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            calls()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    rows = []
    with torch.no_grad():
        for count in (1, 2, 3, 4):
            single, batched = inputs(2), inputs(2 * count)
            torch.cuda.reset_peak_memory_stats()
            one_by_one = milliseconds(lambda: [ControlNetModel.forward(net, **single) for _ in range(count)])
            peak_separate = torch.cuda.max_memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()
            together = milliseconds(lambda: ControlNetModel.forward(net, **batched))
            rows.append({"people": count, "separate_ms": one_by_one, "batched_ms": together,
                         "batched_over_separate": together / one_by_one, "peak_separate_gib": peak_separate,
                         "peak_batched_gib": torch.cuda.max_memory_allocated() / GIB})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--people", default="1,2,3,4")
    parser.add_argument("--speeds", default="full,10sm")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=2, help="timed images after one warm-up")
    parser.add_argument("--reps", type=int, default=10, help="timed IdentityNet calls per case")
    parser.add_argument("--weights", default="/tmp/bench_weights")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from bench_speed import per_speed

    results = per_speed(__file__, args, "people", lambda speed: run_speed(speed, args))
    if results is None:
        return 0
    print("| speed | people | s/image | x 1 person | peak VRAM reserved GiB | peak host RssAnon GiB | plan |")
    print("|---|---|---|---|---|---|---|")
    for result in results:
        base = result["rows"][0]["seconds_per_image"]
        for row in result["rows"]:
            print(f"| {result['speed']} | {row['people']} | {row['seconds_per_image']:.2f} | "
                  f"{row['seconds_per_image'] / base:.2f} | {row['peak_vram_reserved_gib']:.2f} | "
                  f"{row['peak_rss_anon_gib']:.2f} | {row['placement']} |")
    print("\n| speed | people | IdentityNet, one call per person (ms/step) | one batched call (ms/step) | batched / separate |"
          " peak GiB separate / batched |")
    print("|---|---|---|---|---|---|")
    for result in results:
        for row in result["identitynet"]:
            print(f"| {result['speed']} | {row['people']} | {row['separate_ms']:.1f} | {row['batched_ms']:.1f} | "
                  f"{row['batched_over_separate']:.2f} | {row['peak_separate_gib']:.2f} / {row['peak_batched_gib']:.2f} |")
    (Path(args.out) / "bench_people.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
