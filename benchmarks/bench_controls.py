"""Memory and time with extra ControlNets on the free-Colab budget, and what the likeness score costs.

    python3 benchmarks/bench_controls.py --out OUT [--steps 30] [--weights /tmp/bench_weights]

Full-size random weights (smoke: random weights) written in the real layout: the SDXL pipeline and
IdentityNet of bench_generate.py, plus the extra ControlNets the memory plan chooses from (openpose
full, canny full and small, depth small; "small" = diffusers' distilled SDXL ControlNets, no
transformer layers: 168M parameters, the 320 MB of their fp16 files) and the pose and depth annotators
at their real sizes (ViTPose-base, Depth Anything V2 small) on the CPU. Each scenario runs in its own
process capped at 14.75 GiB of VRAM, with the plan choose_plan gives a free T4 (11 GiB RAM): peak VRAM,
peak host RssAnon and s/image (median after a warm-up; the first image includes loading the extra
ControlNets and annotating).

The likeness score (`--likeness`, runs anywhere): the seconds one `FaceAnalyzer.likeness` call takes
per 1024x1024 image, with the smoke detector and (a) the smoke recogniser, (b) a random IResNet-100,
the architecture of antelopev2's glintr100 (65M parameters), through onnxruntime on 2 CPU cores like a
free Colab machine (no onnxruntime-gpu here: on a T4 the face models run on the GPU, faster).
SCRFD-10G's own compute is not included (no full-size detector: about 10 GFLOPs at 640x640 in its paper).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GIB = 2**30
SCENARIOS = {"identity only": (), "+pose": ("pose",), "+pose+canny+depth": ("pose", "canny", "depth")}


def write_controls(root: Path) -> None:
    """Random ControlNets and annotators where weights.ensure_controlnet / ensure_annotator look."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from instantid_colab.controls import ANNOTATOR_REPOS, CONTROL_MODELS
    from instantid_colab.smoke.diffusion import SDXL_UNET_CONFIG, randomise

    marker = root / "bench-controls.json"
    if marker.is_file():
        return
    for kind, variants in CONTROL_MODELS.items():
        for variant, model in variants.items():
            layers = [1, 2, 10] if variant == "full" else [0, 0, 0]
            with torch.device("cuda"):
                unet = UNet2DConditionModel(**{**SDXL_UNET_CONFIG, "transformer_layers_per_block": layers})
                net = randomise(ControlNetModel.from_unet(unet, load_weights_from_unet=False), 7, 0.5).half()
            net.save_pretrained(root / "controlnets" / model.repo.replace("/", "--"), variant="fp16")
            del unet, net
    from transformers import (DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor,
                              VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessor)

    folder = root / "annotators" / ANNOTATOR_REPOS["pose"].replace("/", "--")
    VitPoseForPoseEstimation(VitPoseConfig(num_labels=17)).save_pretrained(folder)  # ViTPose-base
    VitPoseImageProcessor().save_pretrained(folder)
    folder = root / "annotators" / ANNOTATOR_REPOS["depth"].replace("/", "--")
    backbone = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14,
                            out_indices=[3, 6, 9, 12], reshape_hidden_states=False)
    DepthAnythingForDepthEstimation(DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=384,
                                                        neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64,
                                                        head_hidden_size=32)).save_pretrained(folder)
    DPTImageProcessor(size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      do_pad=False).save_pretrained(folder)
    marker.write_text("{}")


def _file(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def run_scenario(name: str, args) -> dict:
    import torch

    from bench_generate import T4_RAM_GIB, T4_VRAM_GIB
    from bench_speed import CAP_GIB, PROMPT, _weights
    from instantid_colab import memory, pipeline, smoke
    from instantid_colab.controls import Control

    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * GIB / torch.cuda.get_device_properties(0).total_memory))
    recorder = memory.StageRecorder(log=lambda row: None)
    with recorder.stage("load"):
        session = pipeline.load_pipeline(_weights(Path(args.weights)), memory.choose_plan(T4_RAM_GIB, T4_VRAM_GIB),
                                         progress=False)
    face = smoke.sample_face_image(512)
    chosen = [Control(kind, face) for kind in SCENARIOS[name]]
    times, notices = [], []
    with recorder.stage("generate"):
        for seed in range(args.images + 1):
            result = pipeline.generate(session, face, PROMPT, seed=seed, steps=args.steps, width=1024, height=1024,
                                       controls=chosen)
            times.append(result.seconds)
            notices += result.notices
    load, generate = recorder.records
    placements = [placement.render() for placement, _ in session.controlnets.loaded.values()]
    return {"scenario": name, "seconds_per_image": statistics.median(times[1:]), "first_image_seconds": times[0],
            "peak_vram_reserved_gib": torch.cuda.max_memory_reserved() / GIB, "peak_rss_anon_gib":
            max(load.rss_anon_peak_gib, generate.rss_anon_peak_gib), "placements": placements,
            "notices": sorted(set(notices)), "steps": args.steps, "device": torch.cuda.get_device_name(0),
            "label": "smoke: random weights"}


def iresnet100_onnx(path: Path) -> None:
    """A random IResNet-100 (insightface's ArcFace backbone: [3, 13, 30, 3] IBasic blocks, 512-d) as ONNX."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, inplanes, planes, stride):
            super().__init__()
            self.body = nn.Sequential(nn.BatchNorm2d(inplanes), nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(planes), nn.PReLU(planes), nn.Conv2d(planes, planes, 3, stride, 1, bias=False),
                                      nn.BatchNorm2d(planes))
            self.down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

        def forward(self, x):
            return self.body(x) + self.down(x)

    layers, widths, blocks, inplanes = [3, 13, 30, 3], [64, 128, 256, 512], [], 64
    for count, width in zip(layers, widths):
        for index in range(count):
            blocks.append(Block(inplanes, width, 2 if index == 0 else 1))
            inplanes = width
    model = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64), *blocks,
                          nn.BatchNorm2d(512), nn.Flatten(), nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512)).eval()
    torch.onnx.export(model, torch.randn(1, 3, 112, 112), str(path), input_names=["data"], output_names=["fc1"],
                      dynamic_axes={"data": {0: "batch"}, "fc1": {0: "batch"}}, opset_version=13, dynamo=False)


def likeness_cost(args) -> dict:
    import shutil

    import numpy as np

    from instantid_colab import faces, smoke
    from instantid_colab.smoke.faces import RECOGNISER_FILE, write_smoke_face_models

    os.sched_setaffinity(0, {0, 1})  # a free Colab machine has 2 vCPUs
    out = {}
    for recogniser in ("smoke", "iresnet100"):
        root = Path(args.weights) / f"likeness-{recogniser}"
        folder = write_smoke_face_models(root)
        if recogniser == "iresnet100":
            iresnet100_onnx(folder / RECOGNISER_FILE)
        analyzer = faces.FaceAnalyzer(root)
        image = smoke.sample_face_image(1024)
        reference = analyzer.detect(image).embedding
        analyzer.likeness(reference, image)  # warm-up
        times = []
        for shade in range(5):  # a different picture each time, as generated ones are
            picture = image.copy()
            picture.putpixel((0, 0), (shade, shade, shade))
            begun = time.perf_counter()
            analyzer.likeness(reference, picture)
            times.append(time.perf_counter() - begun)
        out[recogniser] = {"seconds": statistics.median(times), "bytes": (folder / RECOGNISER_FILE).stat().st_size,
                           "similarity_to_itself": float(np.round(analyzer.likeness(reference, image).similarity, 4))}
        shutil.rmtree(root)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=1, help="timed images after one warm-up")
    parser.add_argument("--weights", default="/tmp/bench_weights")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--likeness", action="store_true", help="only the likeness score's cost (CPU, 2 cores)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.run:
        (out / f"controls_{_file(args.run)}.json").write_text(json.dumps(run_scenario(args.run, args), indent=2))
        return 0
    if args.likeness:
        cost = likeness_cost(args)
        (out / "likeness.json").write_text(json.dumps(cost, indent=2))
        print(json.dumps(cost))
        return 0

    from bench_generate import write_weights

    started = time.perf_counter()
    write_weights(Path(args.weights), tiny=False)
    write_controls(Path(args.weights))
    print(f"weights ready in {time.perf_counter() - started:.0f} s", flush=True)
    results = []
    for name in args.scenarios.split(","):
        done = subprocess.run([sys.executable, __file__, "--run", name, "--out", str(out), "--steps", str(args.steps),
                               "--images", str(args.images), "--weights", args.weights], capture_output=True, text=True)
        path = out / f"controls_{_file(name)}.json"
        results.append(json.loads(path.read_text()) if done.returncode == 0 and path.is_file() else
                       {"scenario": name, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
        if "error" in results[-1]:
            print(done.stderr[-3000:], flush=True)
        print(json.dumps(results[-1])[:400], flush=True)
    done = subprocess.run([sys.executable, __file__, "--likeness", "--out", str(out), "--weights", args.weights],
                          capture_output=True, text=True)
    likeness = json.loads((out / "likeness.json").read_text()) if done.returncode == 0 else {"error": done.stderr[-2000:]}
    print("| scenario | s/image | first image s | peak VRAM reserved GiB | peak host RssAnon GiB | extra ControlNets |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['scenario']} | failed: {r['error'][-150:]} | | | | |")
        else:
            print(f"| {r['scenario']} | {r['seconds_per_image']:.2f} | {r['first_image_seconds']:.1f} | "
                  f"{r['peak_vram_reserved_gib']:.2f} | {r['peak_rss_anon_gib']:.2f} | {'; '.join(r['placements']) or '-'} |")
    print("likeness score per image:", json.dumps(likeness))
    (out / "bench_controls.json").write_text(json.dumps({"scenarios": results, "likeness": likeness}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
