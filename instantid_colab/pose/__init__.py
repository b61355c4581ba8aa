"""ConvNeXtPose XS/S/M/L on Human3.6M: strict checkpoint loading, 3DMPPE evaluation, benchmark.

Imports nothing from the InstantID side of the package.

    from instantid_colab.pose import run_benchmark
    result = run_benchmark("checkpoints/", "data/Human36M", ["XS", "L"], protocol=2, out="outputs/pose")
    print(result.table_markdown()); result.plot("pose.png")
"""

from instantid_colab.pose.benchmark import BenchmarkResult, VariantResult, count_macs, run_benchmark, run_smoke
from instantid_colab.pose.checkpoints import (CheckpointError, CheckpointInfo, inspect_checkpoint, load_pose_model,
                                              write_released_checkpoint)
from instantid_colab.pose.model import ConvNeXtPose, count_parameters
from instantid_colab.pose.variants import VARIANTS, PoseVariant, get_variant

__all__ = ["VARIANTS", "BenchmarkResult", "CheckpointError", "CheckpointInfo", "ConvNeXtPose", "PoseVariant",
           "VariantResult", "count_macs", "count_parameters", "get_variant", "inspect_checkpoint",
           "load_pose_model", "run_benchmark", "run_smoke", "write_released_checkpoint"]
