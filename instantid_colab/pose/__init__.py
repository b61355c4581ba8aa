"""ConvNeXtPose XS/S/M/L on Human3.6M: strict checkpoint loading, 3DMPPE evaluation, benchmark.

Imports nothing from the InstantID side of the package, and nothing heavy until a name below is used
(`python -m instantid_colab.pose --help` runs on the standard library alone).

    from instantid_colab.pose import run_benchmark
    result = run_benchmark("checkpoints/", "data/Human36M", ["XS", "L"], protocol=2, out="outputs/pose")
    print(result.table_markdown()); result.plot("pose.png")
"""

import importlib

_HOMES = {
    "benchmark": ("BenchmarkResult", "VariantResult", "count_macs", "run_benchmark", "run_smoke"),
    "checkpoints": ("CheckpointError", "CheckpointInfo", "inspect_checkpoint", "load_pose_model",
                    "write_released_checkpoint"),
    "model": ("ConvNeXtPose", "count_parameters"),
    "variants": ("VARIANTS", "PoseVariant", "get_variant"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME_OF)


def __getattr__(name: str):
    """The public names, imported from their module on first use (PEP 562)."""
    if name not in _HOME_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME_OF[name]}"), name)
