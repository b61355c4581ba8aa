"""InstantID generation on a GPU: the seeds' recipe vs ours, with random full-size weights (real shapes).

    python3 benchmarks/bench_generate.py --out OUT [--scenarios a,b,c,d] [--steps 30] [--weights /tmp/bench_weights]
    python3 benchmarks/bench_generate.py --out /tmp/bench --tiny      # CPU plumbing check, smoke sizes

Scenarios (each in its own subprocess, so peaks are clean):
  a  the seeds' recipe: load to CPU, enable_model_cpu_offload, attention slicing, VAE slicing + tiling,
     official (non-SDPA) attention processors; capped at 14.75 GiB like a free Colab T4
  b  everything on the GPU with the official non-SDPA processors (diffusers' AttnProcessor +
     IPAdapterAttnProcessor materialise the attention scores); capped
  c  ours: load_pipeline with the plan choose_plan picks for a T4 (11 GiB RAM, 14.7 GiB VRAM); capped
  d  ours with this machine's plan, uncapped
The weights are random (smoke: random weights): the images mean nothing, the memory and time do.
Random fp16 nets may overflow; the NaN-decode redo then triggers and is reported, not fatal.
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

CAP_GIB = 14.75  # what a free Colab T4 lets one process allocate
T4_RAM_GIB, T4_VRAM_GIB = 11.0, 14.7
GIB = 2**30


def write_weights(root: Path, tiny: bool) -> Path:
    """Random weights in the real layout, written once (fp16 safetensors + the fp32 adapter pickle)."""
    import torch

    from instantid_colab import smoke
    from instantid_colab.smoke import adapter as smoke_adapter
    from instantid_colab.smoke.diffusion import FULL, TINY, write_base, write_identitynet
    from instantid_colab.smoke.faces import write_smoke_face_models

    marker = root / "bench-weights.json"
    if marker.is_file() and json.loads(marker.read_text()).get("tiny") == tiny:
        return root
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    dtype = torch.float32 if tiny else torch.float16
    started = time.perf_counter()
    unet = write_base(root / "base", TINY if tiny else FULL, dtype=dtype, device=device)
    write_identitynet(root / "InstantID" / "ControlNetModel", unet, dtype=dtype)
    config = smoke.tiny_resampler_config() if tiny else smoke_adapter.FULL_SIZE
    smoke.write_adapter(root / "InstantID" / "ip-adapter.bin", unet.cpu() if tiny else unet, config)
    del unet
    write_smoke_face_models(root / "faces", name="antelopev2")
    marker.write_text(json.dumps({"tiny": tiny, "seconds": round(time.perf_counter() - started, 1)}))
    return root


def official_processors(pipe) -> None:
    """The official InstantID attention: non-SDPA AttnProcessor / IPAttnProcessor (scores materialised)."""
    from diffusers.models.attention_processor import AttnProcessor, IPAdapterAttnProcessor

    processors = {}
    for name, processor in pipe.unet.attn_processors.items():
        if hasattr(processor, "to_k_ip"):
            module = pipe.unet.get_submodule(name[: -len(".processor")])
            official = IPAdapterAttnProcessor(module.to_q.out_features, processor.to_k_ip[0].in_features,
                                              num_tokens=processor.num_tokens, scale=processor.scale)
            official.load_state_dict(processor.state_dict())
            processors[name] = official.to(processor.to_k_ip[0].weight.device, processor.to_k_ip[0].weight.dtype)
        else:
            processors[name] = AttnProcessor()
    pipe.unet.set_attn_processor(processors)
    pipe.controlnet.set_attn_processor(AttnProcessor())


def scenario_plan(name: str, tiny: bool):
    from dataclasses import replace

    from instantid_colab import memory

    if tiny:  # CPU plumbing check: every scenario runs the CPU plan
        return memory.choose_plan(16, None)
    if name == "c":
        return memory.choose_plan(T4_RAM_GIB, T4_VRAM_GIB, 1024, 1024, 1, (7, 5))
    if name == "a":
        base = memory.choose_plan(T4_RAM_GIB, T4_VRAM_GIB)
        return replace(base, placement="model_offload", text_encoder_device="cuda", face_device="cpu",
                       vae_tiling=True, vae_slicing=True, why="the seeds' recipe")
    return memory.plan_for_this_machine()


def run_scenario(name: str, args) -> dict:
    """Runs inside the child process."""
    import torch

    from instantid_colab import memory, pipeline, smoke
    from instantid_colab.weights import WeightPaths

    cuda = torch.cuda.is_available() and not args.tiny
    capped = name in ("a", "b", "c") and cuda
    if capped:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * GIB / total))
    root = Path(args.weights)
    # Ours (c, d) decode with the fp16-fixed VAE as the product does (random weights here); the seeds'
    # recipe and the official setup (a, b) use the stock SDXL VAE, upcast to float32.
    vae = str(root / "base" / "vae") if name in ("c", "d") else None
    weights = WeightPaths(base=str(root / "base"), controlnet=root / "InstantID" / "ControlNetModel",
                          adapter=root / "InstantID" / "ip-adapter.bin", face_root=root / "faces", vae=vae, smoke=True)
    plan = scenario_plan(name, args.tiny)
    size = 128 if args.tiny else 1024
    face = smoke.sample_face_image(512)

    recorder = memory.StageRecorder(log=lambda row: None)  # samples peak RssAnon (not mmapped weight files)
    with recorder.stage("load"):
        session = pipeline.load_pipeline(weights, plan, progress=False)
        if name in ("a", "b"):
            official_processors(session.pipe)
        if name == "a":
            session.pipe.controlnet.set_attention_slice("auto")
    load_vram = (torch.cuda.max_memory_reserved() / GIB, torch.cuda.max_memory_allocated() / GIB) if cuda else (None, None)

    times, notices = [], []
    with recorder.stage("generate"):  # the stage resets torch's peak statistics
        for index in range(args.images + 1):  # the first image is the warm-up
            result = pipeline.generate(session, face, "a portrait photo of a person", seed=index, steps=args.steps,
                                       width=size, height=size)
            notices += result.notices
            if index:
                times.append(result.seconds)
    gen_vram = (torch.cuda.max_memory_reserved() / GIB, torch.cuda.max_memory_allocated() / GIB) if cuda else (None, None)
    load, gen = recorder.records
    return {
        "scenario": name, "placement": session.plan.placement, "capped_gib": CAP_GIB if capped else None,
        "size": size, "steps": args.steps, "seconds_per_image": statistics.median(times), "times": times,
        "load_seconds": load.seconds, "load_rss_gib": load.rss_anon_peak_gib, "gen_rss_gib": gen.rss_anon_peak_gib,
        "load_vram_reserved_gib": load_vram[0], "load_vram_allocated_gib": load_vram[1],
        "gen_vram_reserved_gib": gen_vram[0], "gen_vram_allocated_gib": gen_vram[1],
        "notices": sorted(set(notices)), "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "label": smoke.SMOKE_LABEL,
    }


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: dict[str, dict]) -> str:
    rows = ["| scenario | placement | s/image | load s | peak VRAM reserved / allocated (GiB) | peak RssAnon load / gen (GiB) | notes |",
            "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | - | - | - | - | - | failed: {r['error'][-200:]} |")
            continue
        vram = max(filter(None, (r["load_vram_reserved_gib"], r["gen_vram_reserved_gib"])), default=None)
        alloc = max(filter(None, (r["load_vram_allocated_gib"], r["gen_vram_allocated_gib"])), default=None)
        notes = ("capped " if r["capped_gib"] else "") + "; ".join(n[:60] for n in r["notices"])
        rows.append(f"| {name} | {r['placement']} | {_fmt(r['seconds_per_image'])} | {_fmt(r['load_seconds'], 1)} | "
                    f"{_fmt(vram)} / {_fmt(alloc)} | {_fmt(r['load_rss_gib'])} / {_fmt(r['gen_rss_gib'])} | {notes} |")
    ok = {k: v for k, v in results.items() if "error" not in v}
    if "c" in ok and "d" in ok:
        rows.append(f"\n(c)/(d) time: {ok['c']['seconds_per_image'] / ok['d']['seconds_per_image']:.2f}")
    if "a" in ok and "c" in ok:
        rows.append(f"(a)/(c) time: {ok['a']['seconds_per_image'] / ok['c']['seconds_per_image']:.2f}")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the JSON results")
    parser.add_argument("--scenarios", default="a,b,c,d")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--images", type=int, default=2, help="timed images after one warm-up")
    parser.add_argument("--weights", default="/tmp/bench_weights", help="random weights folder (reused if present)")
    parser.add_argument("--tiny", action="store_true", help="smoke sizes on CPU: checks the plumbing only")
    parser.add_argument("--run-scenario", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 2 if args.tiny else 30
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.run_scenario:
        result = run_scenario(args.run_scenario, args)
        (out / f"scenario_{args.run_scenario}.json").write_text(json.dumps(result, indent=2))
        return 0

    started = time.perf_counter()
    write_weights(Path(args.weights), args.tiny)
    print(f"weights ready in {time.perf_counter() - started:.0f} s at {args.weights}", flush=True)
    results = {}
    for name in args.scenarios.split(","):
        command = [sys.executable, __file__, "--run-scenario", name, "--out", str(out), "--steps", str(args.steps),
                   "--images", str(args.images), "--weights", args.weights] + (["--tiny"] if args.tiny else [])
        done = subprocess.run(command, capture_output=True, text=True)
        path = out / f"scenario_{name}.json"
        if done.returncode == 0 and path.is_file():
            results[name] = json.loads(path.read_text())
        else:
            results[name] = {"scenario": name, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
            (out / f"scenario_{name}.stderr.txt").write_text(done.stderr)
        print(f"scenario {name}: {json.dumps(results[name])[:400]}", flush=True)
    (out / "bench_generate.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
