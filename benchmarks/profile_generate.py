"""Where one InstantID image's time goes on a GPU: face analysis, prompt, denoising, decode.

    python3 benchmarks/profile_generate.py [--weights /tmp/bench_weights] [--steps 30]

Uses the random full-size weights that bench_generate.py writes (smoke: random weights), our plan
for a free T4, and prints phase times (synchronised) with and without "enhance non-face region",
the ops that took the most GPU time over a few denoising steps, and the Python functions that took
the most host time in one whole image (cProfile): where host overhead beyond plain SDXL comes from.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def timed(phases: dict, name: str, function):
    import torch

    def wrapper(*args, **kwargs):
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = function(*args, **kwargs)
        torch.cuda.synchronize()
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - started
        return result

    return wrapper


def main() -> int:
    import torch

    from bench_generate import T4_RAM_GIB, T4_VRAM_GIB, write_weights
    from instantid_colab import memory, pipeline, smoke
    from instantid_colab.weights import WeightPaths

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", default="/tmp/bench_weights")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    root = write_weights(Path(args.weights), tiny=False)
    weights = WeightPaths(base=str(root / "base"), controlnet=root / "InstantID" / "ControlNetModel",
                          adapter=root / "InstantID" / "ip-adapter.bin", face_root=root / "faces",
                          vae=str(root / "base" / "vae"), smoke=True)
    session = pipeline.load_pipeline(weights, memory.choose_plan(T4_RAM_GIB, T4_VRAM_GIB), progress=False)
    face = smoke.sample_face_image(512)
    phases: dict[str, float] = {}
    session.faces.embed = timed(phases, "face analysis", session.faces.embed)
    session.faces.likeness = timed(phases, "likeness", session.faces.likeness)
    pipeline._encode_prompt = timed(phases, "prompt encoding", pipeline._encode_prompt)
    pipeline.decode = timed(phases, "vae decode", pipeline.decode)
    call = type(session.pipe).__call__
    type(session.pipe).__call__ = timed(phases, "denoising", call)

    names = ("face analysis", "prompt encoding", "denoising", "vae decode", "likeness")
    size = args.size
    print(f"{torch.cuda.get_device_name(0)}; {args.steps} steps, {size}x{size}, CFG; smoke: random weights")
    print("| enhance non-face | total s | " + " | ".join(names) + " | rest |")
    print("|---|---|---|---|---|---|---|---|")
    for enhance in (True, False, True):  # the first run is the warm-up
        phases.clear()
        result = pipeline.generate(session, face, "a portrait photo", steps=args.steps, width=size, height=size,
                                   enhance_non_face=enhance, seed=1)
        rest = result.seconds - sum(phases.values())
        print(f"| {enhance} | {result.seconds:.2f} | " + " | ".join(f"{phases.get(name, 0.0):.3f}" for name in names)
              + f" | {rest:.3f} | {'; '.join(result.notices)}")

    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(pipeline.generate, session, face, "a portrait photo", steps=args.steps, width=size, height=size,
                     seed=1)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        pipeline.generate(session, face, "a portrait photo", steps=3, width=size, height=size, seed=1)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
