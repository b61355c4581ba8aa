"""Command line: `python -m instantid_colab COMMAND`.

Each command is a thin call into the module that owns the concern; heavy imports happen inside
the command so that `doctor` works on a machine where diffusers or torch are broken.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _doctor(args: argparse.Namespace) -> int:
    import json

    from instantid_colab import environment, memory

    env = environment.report()
    problems = environment.check(env)
    snap = memory.snapshot()
    plan = memory.plan_for_this_machine()
    if args.json:
        environment_dict = {**env.to_dict(), "problems": [vars(problem) for problem in problems]}
        print(json.dumps({"environment": environment_dict, "memory": snap.to_dict(), "plan": plan.to_dict()}, indent=2))
    else:
        print(env.render(), "", *(problem.render() for problem in problems), "", snap.render(), "", plan.render(), sep="\n")
        if not problems:
            print("\nNo problems found.")
    return 1 if any(problem.severity == "error" for problem in problems) else 0


def _install(args: argparse.Namespace) -> int:
    from instantid_colab import environment

    result = environment.install(dry_run=args.dry_run, dev=args.dev)
    print(result.render())
    return 0 if result.ok else 1


def _inspect(args: argparse.Namespace) -> int:
    """Read an adapter file's architecture from its shapes; exit 1 with the reason if SDXL InstantID cannot use it."""
    import json

    from instantid_colab.adapter import AdapterError, check_fits, inspect_adapter

    try:
        info = inspect_adapter(args.path)
        check_fits(info)
    except AdapterError as error:
        print(error, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0
    widths = sorted(set(info.ip_hidden_sizes))
    print(f"{info.path}: InstantID adapter ({info.file_format}, {info.dtype}, {info.n_tensors} tensors, {info.n_params:,} parameters)")
    print("  Resampler: " + ", ".join(f"{key}={value}" for key, value in info.to_dict()["resampler"].items()))
    print(f"  IP layers: {info.ip_layers} (widths {widths}), cross_attention_dim {info.cross_attention_dim}: fits SDXL")
    return 0


def _weights(args: argparse.Namespace):
    """Smoke weights, or the real ones (downloaded when missing); MissingWeightsError propagates."""
    if args.smoke:
        from instantid_colab.smoke import build_smoke_weights

        return build_smoke_weights()
    from instantid_colab.weights import ensure_weights

    return ensure_weights(args.weights_dir, base=args.base, drive=args.drive, progress=True)


def _download(args: argparse.Namespace) -> int:
    from instantid_colab.weights import MissingWeightsError, WeightSizeError, ensure_weights

    try:
        weights = ensure_weights(args.weights_dir, base=args.base, drive=args.drive)
    except (MissingWeightsError, WeightSizeError) as error:
        print(error, file=sys.stderr)
        return 1
    for name in ("base", "controlnet", "adapter", "face_root", "vae"):
        print(f"{name:10} {getattr(weights, name)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import random

    from instantid_colab import memory, pipeline
    from instantid_colab.faces import NoFaceError
    from instantid_colab.weights import MissingWeightsError, WeightSizeError

    seed = args.seed if args.seed is not None else random.randrange(2**31)
    try:
        weights = _weights(args)
        face = args.face
        if face is None:
            if not args.smoke:
                print("--face is required (a photo with one clearly visible face).", file=sys.stderr)
                return 2
            from instantid_colab.smoke import sample_face_image

            face = sample_face_image()
        width, height = args.width, args.height
        if args.smoke and width is None and height is None:
            from instantid_colab.smoke import SMOKE_SIZE

            width = height = SMOKE_SIZE
        recorder = memory.StageRecorder() if args.memory else None
        session = pipeline.load_pipeline(weights, recorder=recorder)
        result = pipeline.generate(
            session, face, args.prompt, negative_prompt=args.negative_prompt, style=args.style,
            identitynet_strength=args.identitynet_strength, adapter_strength=args.adapter_strength,
            steps=args.steps, guidance_scale=args.guidance_scale, seed=seed, scheduler=args.scheduler,
            width=width, height=height, num_images=args.num_images, pose_image=args.pose,
            enhance_non_face=args.enhance_non_face, negative_noise=args.negative_noise, combine=args.combine,
            lcm=args.lcm, extra_face_images=args.extra_face or (),
        )
    except (NoFaceError, MissingWeightsError, WeightSizeError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    out = Path(args.out)
    paths = [out] if len(result.images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}")
                                                   for i in range(len(result.images))]
    for image, path in zip(result.images, paths):
        pipeline.save_png(image, path)
    if result.label:
        print(f"[{result.label}]")
    for notice in result.notices:
        print(f"notice: {notice}")
    if recorder is not None:
        print(recorder.render())
    print(f"seed {result.seed}  {result.seconds:.1f} s  plan {result.plan.placement}")
    for index in result.best_first():
        print(f"  {result.likeness[index].render():<52} saved {paths[index]}")
    return 0


def _app(args: argparse.Namespace) -> int:
    from instantid_colab import app, pipeline
    from instantid_colab.weights import MissingWeightsError, WeightSizeError

    try:
        credentials = app.parse_auth(args.auth)
    except ValueError as error:
        print(f"--auth: {error}", file=sys.stderr)
        return 2
    try:
        weights = _weights(args)
    except (MissingWeightsError, WeightSizeError) as error:
        print(error, file=sys.stderr)
        return 1
    app.launch(pipeline.load_pipeline(weights), share=args.share, auth=credentials, port=args.port)
    return 0


def _weights_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights-dir", help="where weights live (default $INSTANTID_WEIGHTS or ~/.cache/instantid-colab)")
    from instantid_colab.weights import DEFAULT_BASE

    parser.add_argument("--base", default=DEFAULT_BASE, help="SDXL base repo (see weights.BASE_MODELS)")
    parser.add_argument("--drive", action="store_true", help="keep weights on the mounted Google Drive")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m instantid_colab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    doctor = commands.add_parser("doctor", help="environment, memory and the memory plan")
    doctor.add_argument("--json", action="store_true", help="one JSON object: environment, memory, plan")
    doctor.set_defaults(handler=_doctor)

    install = commands.add_parser("install", help="install what is missing without touching torch or numpy")
    install.add_argument("--dry-run", action="store_true", help="print the pip commands, change nothing")
    install.add_argument("--dev", action="store_true", help="also the test tools (the package's `dev` extra)")
    install.set_defaults(handler=_install)

    inspect = commands.add_parser("inspect", help="read an InstantID adapter file's architecture")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(handler=_inspect)

    download = commands.add_parser("download", help="fetch the InstantID weights (skips what is on disk)")
    _weights_options(download)
    download.set_defaults(handler=_download)

    generate = commands.add_parser("generate", help="make one image from a face photo")
    generate.add_argument("--face", help="face photo (with --smoke: optional, a drawn smoke face)")
    generate.add_argument("--extra-face", action="append", help="more photos of the same person (repeatable)")
    generate.add_argument("--combine", default="average", choices=("average", "norm_average", "concat"))
    generate.add_argument("--prompt", default="", help='empty: "a person" (the official default)')
    generate.add_argument("--negative-prompt", default=None)
    generate.add_argument("--style", default="No style")
    generate.add_argument("--out", default="outputs/instantid.png")
    generate.add_argument("--seed", type=int, help="default: random (printed)")
    generate.add_argument("--steps", type=int, default=30)
    generate.add_argument("--guidance-scale", type=float, default=5.0)
    generate.add_argument("--scheduler", default="Euler")
    generate.add_argument("--identitynet-strength", type=float, default=0.8)
    generate.add_argument("--adapter-strength", type=float, default=0.8)
    generate.add_argument("--width", type=int)
    generate.add_argument("--height", type=int)
    generate.add_argument("--num-images", type=int, default=1)
    generate.add_argument("--pose", help="take the face keypoints (and output size) from this photo")
    generate.add_argument("--enhance-non-face", action=argparse.BooleanOptionalAction, default=True)
    generate.add_argument("--negative-noise", type=float, default=0.0, help="ComfyUI's 0.35 fights burn")
    generate.add_argument("--lcm", action="store_true", help="LCM-LoRA: use ~5-10 steps, guidance ~1.5")
    generate.add_argument("--memory", action="store_true", help="print the per-stage memory table")
    generate.add_argument("--smoke", action="store_true", help="tiny random weights (smoke: random weights), offline")
    _weights_options(generate)
    generate.set_defaults(handler=_generate)

    app = commands.add_parser("app", help="the gradio app")
    app.add_argument("--smoke", action="store_true", help="tiny random weights (smoke: random weights), no download")
    app.add_argument("--share", action=argparse.BooleanOptionalAction, default=None,
                     help="public gradio link (default: on in Colab, off elsewhere)")
    app.add_argument("--auth", metavar="USER:PASS", help="require this login (share links are public)")
    app.add_argument("--port", type=int, help="local port (default: gradio's, 7860 or the next free one)")
    _weights_options(app)
    app.set_defaults(handler=_app)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
