"""ConvNeXtPose XS/S/M/L with random weights: params, MACs, batch-1 latency and throughput.

    python3 benchmarks/bench_pose.py --out $OUT

Needs torch, numpy, tqdm (matplotlib optional, for the plot). On a GPU it measures fp32 and fp16
(autocast) with channels_last, CUDA-synchronised timing, warmup, median over repeats. Accuracy
needs the released checkpoints and Human3.6M: `python -m instantid_colab.pose bench --checkpoints
DIR --h36m DIR`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from instantid_colab.pose.benchmark import RANDOM_LABEL, run_benchmark  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/bench_pose")
    parser.add_argument("--variants", default="XS,S,M,L")
    parser.add_argument("--batch", type=int, default=256, help="throughput batch size")
    parser.add_argument("--repeats", type=int, default=50, help="timed batch-1 runs (throughput uses a fifth)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    torch.backends.cudnn.benchmark = True
    result = run_benchmark(None, None, args.variants.split(","), out=args.out, device=args.device,
                           batch=args.batch, repeats=args.repeats, label=RANDOM_LABEL)
    print(f"torch {torch.__version__}; {RANDOM_LABEL}")
    print(result.table_markdown())
    print(json.dumps(result.to_json(), indent=1))
    print(f"results.md, variant_*.json and (with matplotlib) accuracy_vs_speed.png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
