"""Speed of ours against plain SDXL + ControlNet and the seeds' recipe, on the same random weights, in one run.

    python3 benchmarks/bench_speed.py --out OUT [--scenarios plain,ours,seeds] [--speeds full,10sm] [--steps 10]

Each scenario runs in its own process, capped at 14.75 GiB like a free Colab T4, 1024x1024, CFG 5:
  plain    diffusers' StableDiffusionXLControlNetPipeline, the IdentityNet's weights as an ordinary
           ControlNet fed the text, no adapter, no face analysis: what InstantID costs is measured against it
  ours     pipeline.generate with the plan a free T4 gets (face analysis and the likeness score included)
  seeds    the seeds' recipe: model CPU offload, attention and VAE slicing, the official non-SDPA processors
(Channels-last activations and fused self-attention QKV were measured with this script and not kept:
BENCHMARKS.md.)
Speeds: `full` is the whole GPU; `10sm` runs the process on 10 streaming multiprocessors through a CUDA
green context, made before any CUDA work: GPU-bound like a T4 (40 SMs of a slower generation).
Reported per scenario: the median wall seconds per image over the timed images (after a warm-up), and
the GPU-busy seconds of one more, profiled image (sum of kernel and copy times): busy / wall shows how
much of the time the GPU works. The weights are random (smoke: random weights): time and memory are
real, the images mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CAP_GIB = 14.75
GIB = 2**30
PROMPT = "a portrait photo of a person in a garden"


_GREEN_CONTEXT = []  # kept alive for the process: a collected green context destroys the CUDA context


def _enter_speed(speed: str) -> None:
    import torch

    if speed == "10sm":
        from torch.cuda.green_contexts import GreenContext

        _GREEN_CONTEXT.append(GreenContext.create(num_sms=10, device_id=0))
        _GREEN_CONTEXT[0].set_context()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * GIB / total))


def each_speed(script: str, speeds: str, out: Path, prefix: str) -> list[dict]:
    """`script --run SPEED` with this command line, once per speed, each in a process of its own (a green context
    lasts as long as its process); the results each wrote to OUT/PREFIX_SPEED.json."""
    results = []
    for speed in speeds.split(","):
        done = subprocess.run([sys.executable, script, "--run", speed, *sys.argv[1:]])
        path = out / f"{prefix}_{speed}.json"
        if done.returncode == 0 and path.is_file():
            results.append(json.loads(path.read_text()))
    return results


def per_speed(script: str, args, prefix: str, measure, prepare=None) -> list[dict] | None:
    """The driver of a side-by-side benchmark. With `--run SPEED` this process measures one speed (`measure(SPEED)`)
    and writes OUT/PREFIX_SPEED.json, returning None; without, it writes the random full-size weights (and what
    `prepare(root)` adds), runs every speed in a process of its own and returns their results."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.run:
        (out / f"{prefix}_{args.run}.json").write_text(json.dumps(measure(args.run), indent=2))
        return None
    from bench_generate import write_weights

    started = time.perf_counter()
    write_weights(Path(args.weights), tiny=False)
    if prepare is not None:
        prepare(Path(args.weights))
    print(f"weights ready in {time.perf_counter() - started:.0f} s", flush=True)
    return each_speed(script, args.speeds, out, prefix)


def _gpu_busy_seconds(function) -> float:
    """Kernel + copy time on the GPU while `function` runs once (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        function()
    return sum(event.self_device_time_total for event in prof.key_averages()) / 1e6


def _weights(root: Path):
    from instantid_colab.weights import WeightPaths

    return WeightPaths(base=str(root / "base"), controlnet=root / "InstantID" / "ControlNetModel",
                       adapter=root / "InstantID" / "ip-adapter.bin", face_root=root / "faces",
                       vae=str(root / "base" / "vae"), smoke=True)


def _plain(root: Path, steps: int):
    """diffusers' SDXL ControlNet pipeline on the same weights, all on the GPU in fp16; returns make()."""
    import torch
    from diffusers import (AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from instantid_colab import components, faces

    def load(cls, path, **kwargs):
        return components.load(cls, path, "cuda", torch.float16, **kwargs)

    base = str(root / "base")
    pipe = StableDiffusionXLControlNetPipeline(
        vae=load(AutoencoderKL, base, subfolder="vae"), text_encoder=load(CLIPTextModel, base, subfolder="text_encoder"),
        text_encoder_2=load(CLIPTextModelWithProjection, base, subfolder="text_encoder_2"),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2"),
        unet=load(UNet2DConditionModel, base, subfolder="unet"),
        controlnet=load(ControlNetModel, root / "InstantID" / "ControlNetModel"),
        scheduler=EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler"), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    kps = faces.draw_kps((1024, 1024), [[400, 400], [620, 400], [510, 520], [420, 640], [600, 640]])

    def make(seed: int):
        return pipe(PROMPT, image=kps, num_inference_steps=steps, guidance_scale=5.0, width=1024, height=1024,
                    controlnet_conditioning_scale=0.8, generator=torch.Generator("cpu").manual_seed(seed)).images

    return make


def _ours(root: Path, steps: int, name: str):
    from dataclasses import replace

    from bench_generate import T4_RAM_GIB, T4_VRAM_GIB, official_processors
    from instantid_colab import memory, pipeline, smoke

    plan = memory.choose_plan(T4_RAM_GIB, T4_VRAM_GIB)
    weights = _weights(root)
    if name == "seeds":
        plan = replace(plan, placement="model_offload", text_encoder_device="cuda", face_device="cpu",
                       vae_tiling=True, vae_slicing=True, why="the seeds' recipe")
        weights = replace(weights, vae=None)
    session = pipeline.load_pipeline(weights, plan, progress=False)
    if name == "seeds":
        official_processors(session.pipe)
        session.pipe.controlnet.set_attention_slice("auto")
    face = smoke.sample_face_image(512)

    def make(seed: int):
        return pipeline.generate(session, face, PROMPT, seed=seed, steps=steps, width=1024, height=1024).images

    return make


def run_scenario(name: str, speed: str, args) -> dict:
    import torch

    _enter_speed(speed)
    root = Path(args.weights)
    started = time.perf_counter()
    make = _plain(root, args.steps) if name == "plain" else _ours(root, args.steps, name)
    load_seconds = time.perf_counter() - started
    times = []
    for index in range(args.images + 1):  # the first image is the warm-up (and the compile, where there is one)
        torch.cuda.synchronize()
        begun = time.perf_counter()
        make(index)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - begun)
    busy = _gpu_busy_seconds(lambda: make(99))
    return {"scenario": name, "speed": speed, "steps": args.steps, "seconds_per_image": statistics.median(times[1:]),
            "first_image_seconds": times[0], "times": times, "gpu_busy_seconds": busy, "load_seconds": load_seconds,
            "peak_vram_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            "device": torch.cuda.get_device_name(0), "label": "smoke: random weights"}


def _file(name: str, speed: str) -> str:
    return f"{name}-{speed}".replace("+", "-")


def table(results: list[dict]) -> str:
    """One row per (speed, scenario): medians over the rounds; `x plain` per round, then their median."""
    rows = ["| speed | scenario | rounds | s/image | x plain (per round) | x plain | GPU-busy s | busy / wall | "
            "first image s | peak VRAM GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    ok = [r for r in results if "error" not in r]
    plain = {(r["speed"], r["round"]): r["seconds_per_image"] for r in ok if r["scenario"] == "plain"}
    keys = list(dict.fromkeys((r["speed"], r["scenario"]) for r in results))
    for speed, name in keys:
        runs = [r for r in ok if (r["speed"], r["scenario"]) == (speed, name)]
        failed = [r for r in results if "error" in r and (r["speed"], r["scenario"]) == (speed, name)]
        if not runs:
            rows.append(f"| {speed} | {name} | 0 | failed: {failed[0]['error'][-150:]} | | | | | | |")
            continue
        ratios = [r["seconds_per_image"] / plain[(speed, r["round"])] for r in runs if (speed, r["round"]) in plain]
        wall = statistics.median(r["seconds_per_image"] for r in runs)
        busy = statistics.median(r["gpu_busy_seconds"] for r in runs)
        rows.append(f"| {speed} | {name} | {len(runs)} | {wall:.2f} | {', '.join(f'{x:.2f}' for x in ratios) or '-'} | "
                    f"{statistics.median(ratios):.3f} | {busy:.2f} | {busy / wall:.2f} | "
                    f"{statistics.median(r['first_image_seconds'] for r in runs):.1f} | "
                    f"{max(r['peak_vram_reserved_gib'] for r in runs):.2f} |" if ratios else
                    f"| {speed} | {name} | {len(runs)} | {wall:.2f} | - | - | {busy:.2f} | {busy / wall:.2f} | - | - |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", default="plain,ours,seeds")
    parser.add_argument("--speeds", default="full,10sm")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=2, help="timed images after one warm-up")
    parser.add_argument("--weights", default="/tmp/bench_weights")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole list, interleaved (noisy machines)")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.run:
        name, _, speed = args.run.partition("@")
        result = run_scenario(name, speed, args)
        (out / f"speed_{_file(name, speed)}.json").write_text(json.dumps(result, indent=2))
        return 0

    from bench_generate import write_weights

    started = time.perf_counter()
    write_weights(Path(args.weights), tiny=False)
    print(f"weights ready in {time.perf_counter() - started:.0f} s", flush=True)
    results = []
    for round_ in range(args.rounds):
        for speed in args.speeds.split(","):
            results += _round(args, out, speed, round_)
    (out / "bench_speed.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


def _round(args, out: Path, speed: str, round_: int) -> list[dict]:
    """Every scenario once at `speed`, each in its own process."""
    results = []
    for name in args.scenarios.split(","):
        command = [sys.executable, __file__, "--run", f"{name}@{speed}", "--out", str(out), "--steps",
                   str(args.steps), "--images", str(args.images), "--weights", args.weights]
        done = subprocess.run(command, capture_output=True, text=True)
        path = out / f"speed_{_file(name, speed)}.json"
        if done.returncode == 0 and path.is_file():
            results.append({**json.loads(path.read_text()), "round": round_})
        else:
            print(done.stderr[-3000:], flush=True)
            results.append({"scenario": name, "speed": speed, "round": round_,
                            "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
        print(json.dumps(results[-1])[:300], flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
