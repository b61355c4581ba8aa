"""`python -m instantid_colab.pose inspect PATH [--json]` and `... bench --checkpoints DIR --h36m DIR`."""

from __future__ import annotations

import argparse
import json
import sys

from instantid_colab import cli_errors
from instantid_colab.settings import SettingsError, check_arguments


def _inspect(args: argparse.Namespace) -> int:
    from instantid_colab.pose.checkpoints import inspect_checkpoint

    info = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        print(f"ConvNeXtPose-{info.variant}: depth_dim {info.depth_dim}, head {info.head_channels} channels, "
              f"{info.joints} joints, {info.heatmap_size}^3 heatmap, {info.params:,} parameters, epoch {info.epoch}, "
              f"{info.key_format} head keys{', module. prefix' if info.module_prefix else ''}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from instantid_colab.pose.benchmark import SMOKE_LABEL, run_benchmark, run_smoke
    from instantid_colab.pose.variants import get_variant

    check_arguments(batch=(args.batch, "pose_batch"))
    variants = [get_variant(v.strip()).name for v in args.variants.split(",")] if args.variants else None
    if args.smoke:
        print(SMOKE_LABEL)
        result = run_smoke(args.out, variants, args.protocol)
    else:
        result = run_benchmark(args.checkpoints, args.h36m, variants, args.protocol, args.out, device=args.device,
                               batch=args.batch)
    print(result.table_markdown())
    print(f"Results, per-variant JSON and accuracy_vs_speed.png in {result.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m instantid_colab.pose", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="read a ConvNeXtPose checkpoint's variant from its shapes")
    inspect.add_argument("path", help="released .tar/.pth, its unzipped folder, or a state dict")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(handler=_inspect)
    cli_errors.debug_option(inspect)
    bench = commands.add_parser("bench", help="params, MACs, speed and Human3.6M error per variant")
    bench.add_argument("--checkpoints", help="folder with ConvNeXtPose_*.tar (omit: random weights, speed only)")
    bench.add_argument("--h36m", help="Human3.6M root in 3DMPPE layout (omit: no accuracy)")
    bench.add_argument("--variants", help="comma list, e.g. XS,S,M,L (default: all found)")
    bench.add_argument("--protocol", type=int, choices=(1, 2), default=2,
                       help="3DMPPE numbering: 2 = S9+S11 MPJPE, 1 = S11 PA-MPJPE")
    bench.add_argument("--out", default="outputs/pose_bench")
    bench.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--batch", type=int, default=256, help="batch size for throughput")
    bench.add_argument("--smoke", action="store_true",
                       help="smoke: random weights, synthetic data, written under --out; checks the whole path")
    bench.set_defaults(handler=_bench)
    cli_errors.debug_option(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cli_errors.run(args.handler, args, user_errors=(FileNotFoundError, ValueError),  # CheckpointError too
                          usage_errors=(SettingsError,))


if __name__ == "__main__":
    sys.exit(main())
