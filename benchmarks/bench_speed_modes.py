"""Speed modes side by side on the same random weights: every preset, the guidance interval, previews, and
regional torch.compile.

    python3 benchmarks/bench_speed_modes.py --out OUT [--speeds full,10sm] [--images 2]
    python3 benchmarks/bench_speed_modes.py --out OUT --compile [--speeds 10sm] [--batch 16] [--steps 10]

Random full-size weights (smoke: random weights) in the real layout (bench_generate.py), plus a random LoRA of
rank 64 on the UNet's attention and feed-forward projections standing in for every preset's distilled LoRA
(its cost is what the adapter layers add, not what they learned) and a random TAESDXL (AutoencoderTiny, the
taesdxl architecture). One process per speed (`10sm`: a CUDA green context of 10 streaming multiprocessors,
GPU-bound like a T4; `full`: the whole GPU), capped at 14.75 GiB, the plan a free T4 gets, 1024x1024. s/image is
the median of `--images` after a warm-up (which loads a preset's LoRA).
Scenarios: `quality` (30 steps, CFG 5), `interval` (the same with CFG only on steps 0.17-0.9 of the schedule:
the paper's SDXL interval, sigma in (0.28, 5.42], at 30 Euler steps), `previews` (quality with a TAESDXL preview
every 5 steps), then each few-step preset at its model card's settings.
`--compile`: `--batch` images at `--steps` with and without `unet.compile_repeated_blocks()` (diffusers' regional
compile of the transformer blocks), the compile included in the first image: does it pay back within the batch?
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

PROMPT = "a portrait photo of a person in a garden"
PAPER_SDXL_INTERVAL = (0.17, 0.9)  # sigma in (0.28, 5.42] is steps 5-26 of 30 Euler steps: int(0.17*30)=5, int(0.9*30)=27


def write_speed_files(root: Path) -> None:
    """One random rank-64 LoRA placed as every preset's LoRA, and a random TAESDXL, where the weights module looks."""
    import shutil

    import torch
    from diffusers import AutoencoderTiny, StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from instantid_colab.speed import SPEEDS, TAESD_REPO

    marker = root / "bench-speed.json"
    if marker.is_file():
        return
    unet = UNet2DConditionModel.from_pretrained(root / "base", subfolder="unet", torch_dtype=torch.float16).to("cuda")
    unet.add_adapter(LoraConfig(r=64, lora_alpha=64, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                "ff.net.0.proj", "ff.net.2"]))
    folder = root / "bench-lora"
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    del unet
    for preset in SPEEDS.values():
        if preset.lora:
            target = root / "loras" / preset.lora[0].replace("/", "--") / preset.lora[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / "pytorch_lora_weights.safetensors", target)
    AutoencoderTiny().save_pretrained(root / "previews" / TAESD_REPO.replace("/", "--"))
    marker.write_text(json.dumps({"lora_bytes": (folder / "pytorch_lora_weights.safetensors").stat().st_size}))


def _session():
    from bench_generate import T4_RAM_GIB, T4_VRAM_GIB
    from bench_speed import _weights
    from instantid_colab import memory, pipeline

    return pipeline.load_pipeline(_weights(Path(ARGS.weights)), memory.choose_plan(T4_RAM_GIB, T4_VRAM_GIB),
                                  progress=False)


def run_modes(speed: str) -> dict:
    import torch

    from bench_speed import _enter_speed
    from instantid_colab import pipeline, smoke
    from instantid_colab.speed import SPEEDS

    _enter_speed(speed)
    session = _session()
    face = smoke.sample_face_image(512)
    scenarios = {"quality": {}, "interval": {"guidance_interval": PAPER_SDXL_INTERVAL},
                 "previews": {"preview": lambda step, total, image: None, "preview_every": 5},
                 **{name: {"speed": name} for name in SPEEDS if name != "quality"}}
    rows = []
    for name, options in scenarios.items():
        times = []
        for seed in range(ARGS.images + 1):
            result = pipeline.generate(session, face, PROMPT, seed=seed, width=1024, height=1024, **options)
            times.append(result.seconds)
        rows.append({"scenario": name, "seconds_per_image": statistics.median(times[1:]), "times": times,
                     "steps": result.settings["steps"], "guidance_scale": result.settings["guidance_scale"],
                     "scheduler": result.settings["scheduler"],
                     "unconditional_steps": result.settings["unconditional_steps"]})
        print(json.dumps(rows[-1]), flush=True)
    return {"speed": speed, "device": torch.cuda.get_device_name(0), "rows": rows, "label": smoke.SMOKE_LABEL}


def run_compile(speed: str) -> dict:
    import torch

    from bench_speed import _enter_speed
    from instantid_colab import pipeline, smoke

    _enter_speed(speed)
    session = _session()
    face = smoke.sample_face_image(512)
    out = {"speed": speed, "batch": ARGS.batch, "steps": ARGS.steps, "label": smoke.SMOKE_LABEL}
    for compiled in (False, True):
        if compiled:
            session.pipe.unet.compile_repeated_blocks()
        else:
            pipeline.generate(session, face, PROMPT, seed=99, steps=ARGS.steps, width=1024, height=1024)  # warm-up
        times = []
        for seed in range(ARGS.batch):
            started = time.perf_counter()
            pipeline.generate(session, face, PROMPT, seed=seed, steps=ARGS.steps, width=1024, height=1024)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        out["compiled" if compiled else "eager"] = {"total_seconds": sum(times), "times": times,
                                                    "per_image_after_first": statistics.median(times[1:])}
        print(json.dumps({"compiled": compiled, "total": sum(times), "first": times[0]}), flush=True)
    return out


ARGS: argparse.Namespace


def main() -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--speeds", default="full,10sm")
    parser.add_argument("--images", type=int, default=2, help="timed images after one warm-up")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--weights", default="/tmp/bench_weights")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    ARGS = parser.parse_args()
    from bench_speed import per_speed

    kind = "compile" if ARGS.compile else "modes"
    results = per_speed(__file__, ARGS, kind, run_compile if ARGS.compile else run_modes, prepare=write_speed_files)
    if results is None:
        return 0
    if ARGS.compile:
        print("| speed | images | eager total s | compiled total s (compile included) | compiled s/image after the first |"
              " eager s/image |")
        print("|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['speed']} | {r['batch']} | {r['eager']['total_seconds']:.1f} | {r['compiled']['total_seconds']:.1f} | "
                  f"{r['compiled']['per_image_after_first']:.2f} | {r['eager']['per_image_after_first']:.2f} |")
    else:
        print("| speed | scenario | steps | guidance | scheduler | steps with the unconditional half | s/image | x quality |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            base = r["rows"][0]["seconds_per_image"]
            for row in r["rows"]:
                print(f"| {r['speed']} | {row['scenario']} | {row['steps']} | {row['guidance_scale']} | {row['scheduler']} | "
                      f"{row['unconditional_steps']} | {row['seconds_per_image']:.2f} | {row['seconds_per_image'] / base:.2f} |")
    (Path(ARGS.out) / f"bench_speed_{kind}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
