"""ConvNeXtPose XS/S/M/L: parameters, MACs, GPU latency/throughput and Human3.6M error vs the paper.

Resumable: each variant's figures go to OUT/variant_{NAME}.json, and a rerun with the same settings
reuses them. MACs come from torch.utils.flop_counter.FlopCounterMode (maintained by PyTorch), as
FLOPs / 2 over convolutions and matrix products (BN, ReLU, upsampling and softmax are not counted,
as in the paper's torchprofile count).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from instantid_colab.pose.model import ConvNeXtPose, count_parameters
from instantid_colab.pose.variants import VARIANTS, PoseVariant

SMOKE_LABEL = "smoke: random weights, synthetic data"
RANDOM_LABEL = "random weights (speed only)"


def count_macs(model: torch.nn.Module, input_size: int = 256) -> int:
    """Multiply-accumulates for one image (FLOPs / 2 from FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(model.parameters())
    images = torch.zeros(1, 3, input_size, input_size, device=parameter.device, dtype=parameter.dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images)
    return counter.get_total_flops() // 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_forward(model: torch.nn.Module, batch: int, dtype: torch.dtype = torch.float32, warmup: int = 10,
                 repeats: int = 30, input_size: int = 256) -> float:
    """Median seconds per forward pass (synchronised; fp16 through autocast on CUDA)."""
    device = next(model.parameters()).device
    images = torch.randn(batch, 3, input_size, input_size, device=device).contiguous(memory_format=torch.channels_last)
    use_autocast = dtype != torch.float32
    times = []
    for step in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
            model(images)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class VariantResult:
    variant: str
    label: str  # "released weights", RANDOM_LABEL or SMOKE_LABEL
    device: str
    params: int
    macs: int
    latency_ms: dict[str, float] = field(default_factory=dict)  # {"fp32": .., "fp16": ..} at batch 1
    throughput: dict[str, float] = field(default_factory=dict)  # images/s at `batch`
    batch: int = 0
    checkpoint: str | None = None
    epoch: int | None = None
    protocol: int | None = None
    metric: str | None = None
    score_mm: float | None = None
    paper_mm: float | None = None
    h36m: dict | None = None  # H36MResult as a dict
    settings: dict = field(default_factory=dict)

    @property
    def difference_mm(self) -> float | None:
        return None if self.score_mm is None or self.paper_mm is None else self.score_mm - self.paper_mm


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


@dataclass
class BenchmarkResult:
    rows: list[VariantResult]
    out: Path | None = None

    def table_markdown(self) -> str:
        precisions = sorted({p for row in self.rows for p in row.latency_ms}, key=lambda p: p != "fp32")
        head = ["variant", "weights", "params (M)", "GMACs"]
        head += [f"latency b1 {p} (ms)" for p in precisions]
        head += [f"throughput {p} (img/s)" for p in precisions]
        head += ["metric", "ours (mm)", "paper (mm)", "diff (mm)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            cells = [row.variant, row.label, f"{row.params / 1e6:.3f}", f"{row.macs / 1e9:.2f}"]
            cells += [_fmt(row.latency_ms.get(p)) for p in precisions]
            cells += [_fmt(row.throughput.get(p), 0) + (f" (b{row.batch})" if p in row.throughput else "")
                      for p in precisions]
            cells += [f"P{row.protocol} {row.metric}" if row.metric else "n/a", _fmt(row.score_mm),
                      _fmt(row.paper_mm), _fmt(row.difference_mm)]
            lines.append("| " + " | ".join(cells) + " |")
        devices = sorted({row.device for row in self.rows})
        lines.append(f"\nDevice: {', '.join(devices)}. MACs = FLOPs/2 of convolutions (FlopCounterMode), "
                     "input 256x256. Latency: median, batch 1.")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Error (or, without a dataset, GMACs) against batch-1 latency; matplotlib with Agg."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        precision = "fp16" if any("fp16" in r.latency_ms for r in self.rows) else "fp32"
        scored = all(r.score_mm is not None for r in self.rows)
        figure, axis = plt.subplots(figsize=(6, 4))
        for row in self.rows:
            x = row.latency_ms.get(precision)
            y = row.score_mm if scored else row.macs / 1e9
            axis.scatter(x, y, label=f"{row.variant} ours")
            axis.annotate(row.variant, (x, y), textcoords="offset points", xytext=(4, 4))
            if scored and row.paper_mm is not None:
                axis.scatter(x, row.paper_mm, marker="x", color="grey")
        axis.set_xlabel(f"latency, batch 1, {precision} (ms)")
        axis.set_ylabel(f"{self.rows[0].metric} (mm; x = paper)" if scored else "GMACs")
        labels = sorted({r.label for r in self.rows})
        axis.set_title(f"ConvNeXtPose on {self.rows[0].device}\n{'; '.join(labels)}", fontsize=9)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path

    def to_json(self) -> list[dict]:
        return [asdict(row) | {"difference_mm": row.difference_mm} for row in self.rows]


def find_checkpoints(folder: str | Path) -> dict[str, Path]:
    """Map variant name -> checkpoint for every readable checkpoint in folder (the file decides)."""
    from instantid_colab.pose.checkpoints import CheckpointError, inspect_checkpoint

    found: dict[str, Path] = {}
    for candidate in sorted(Path(folder).iterdir()):
        try:
            found.setdefault(inspect_checkpoint(candidate).variant, candidate)
        except CheckpointError:
            continue
    return found


def pick_device(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def measure_speed(model: ConvNeXtPose, device: torch.device, batch: int, precisions: tuple[str, ...],
                  repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """(latency ms at batch 1, images/s at `batch`) per precision."""
    model = model.to(device, memory_format=torch.channels_last).eval()
    if "fp16" in precisions and device.type != "cuda":
        raise ValueError("fp16 timing needs a CUDA GPU (CPUs have no fast fp16); time fp32 on CPU")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    latency, throughput = {}, {}
    for precision in precisions:
        dtype = dtypes[precision]
        latency[precision] = 1000 * time_forward(model, 1, dtype, repeats=repeats)
        throughput[precision] = batch / time_forward(model, batch, dtype, warmup=3, repeats=max(3, repeats // 5))
    return latency, throughput


def run_benchmark(checkpoints: str | Path | None = None, h36m: str | Path | None = None,
                  variants: list[str] | None = None, protocol: int = 2, out: str | Path = "outputs/pose_bench",
                  *, device: str | None = None, batch: int = 256, precisions: tuple[str, ...] | None = None,
                  repeats: int = 30, flip_test: bool = True, eval_batch: int = 64, num_workers: int = 2,
                  label: str | None = None, progress: bool = True) -> BenchmarkResult:
    """Benchmark each variant; released checkpoints (found by shape) if given, else random weights.

    With `h36m`, runs the protocol's test set (GT box and root, flip test) and compares with the
    paper. fp16 is timed on CUDA only.
    """
    from tqdm.auto import tqdm

    from instantid_colab.pose import h36m as h36m_data
    from instantid_colab.pose.checkpoints import load_pose_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_device = pick_device(device)
    precisions = precisions or (("fp32", "fp16") if torch_device.type == "cuda" else ("fp32",))
    files = find_checkpoints(checkpoints) if checkpoints else {}
    names = [v.upper() for v in variants] if variants else list(VARIANTS)
    if checkpoints and not variants:
        names = [n for n in names if n in files]
    testset = h36m_data.load_h36m_test(h36m, protocol) if h36m else None
    rows = []
    for name in tqdm(names, desc="variants", disable=not progress):
        variant: PoseVariant = VARIANTS[name]
        checkpoint = files.get(name)
        if checkpoints and checkpoint is None:
            raise FileNotFoundError(f"No checkpoint for ConvNeXtPose-{name} in {checkpoints} (found: "
                                    f"{', '.join(files) or 'none'}). Drop --variants {name} or add its .tar file.")
        settings = {"checkpoint": str(checkpoint) if checkpoint else None, "h36m": str(h36m) if h36m else None,
                    "protocol": protocol if h36m else None, "device": str(torch_device), "batch": batch,
                    "precisions": list(precisions), "flip_test": flip_test, "label": label}
        cache = out / f"variant_{name}.json"
        if cache.is_file():
            cached = json.loads(cache.read_text())
            cached.pop("difference_mm", None)
            if cached.get("settings") == settings:
                rows.append(VariantResult(**cached))
                continue
        if checkpoint:
            model, info = load_pose_model(checkpoint)
            epoch, row_label = info.epoch, label or "released weights"
        else:
            model, epoch, row_label = ConvNeXtPose(variant).eval(), None, label or RANDOM_LABEL
        device_name = torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu"
        row = VariantResult(variant=name, label=row_label, device=device_name, params=count_parameters(model),
                            macs=count_macs(model), batch=batch, checkpoint=settings["checkpoint"], epoch=epoch,
                            settings=settings)
        row.latency_ms, row.throughput = measure_speed(model, torch_device, batch, precisions, repeats)
        if testset is not None:
            model = model.to(memory_format=torch.contiguous_format)
            loader = h36m_data.make_loader(testset, eval_batch, num_workers)
            coords = h36m_data.predict(model, loader, variant.heatmap_size, flip_test, torch_device, progress,
                                       f"{name} P{protocol}")
            result = h36m_data.evaluate(testset, coords, variant.heatmap_size, variant.depth_dim)
            row.protocol, row.metric, row.score_mm, row.h36m = protocol, result.metric, result.score, asdict(result)
            row.paper_mm = variant.paper_mpjpe_p2 if protocol == 2 else variant.paper_pa_mpjpe_p1
        cache.write_text(json.dumps(asdict(row), indent=2))
        rows.append(row)
        del model
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
    result = BenchmarkResult(rows, out)
    (out / "results.md").write_text(result.table_markdown() + "\n")
    try:
        result.plot(out / "accuracy_vs_speed.png")
    except ImportError as error:  # a machine set up without `install` (the GPU box): the table is the result
        print(f"plot skipped: {error.name} is not installed (`python -m instantid_colab install` adds it)")
    return result


def write_smoke_inputs(folder: str | Path, variants: list[str] | None = None) -> tuple[Path, Path]:
    """Random-weight checkpoints in the released format + a synthetic H36M-layout set, under folder."""
    from instantid_colab.pose.checkpoints import write_released_checkpoint
    from instantid_colab.pose.h36m import write_synthetic_h36m

    folder = Path(folder)
    checkpoints = folder / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(variants or list(VARIANTS)):
        torch.manual_seed(index)
        write_released_checkpoint(checkpoints / f"ConvNeXtPose_{name}.tar", ConvNeXtPose(VARIANTS[name]),
                                  epoch=60 + index, key_format="indexed" if name in ("M", "L") else "named")
    return checkpoints, write_synthetic_h36m(folder / "Human36M")


def run_smoke(out: str | Path | None = None, variants: list[str] | None = None, protocol: int = 2,
              progress: bool = True) -> BenchmarkResult:
    """The whole path (write, inspect, load, crop, predict, evaluate, table, plot) in about a minute on CPU."""
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="pose_smoke_"))
    checkpoints, dataset = write_smoke_inputs(out / "inputs", variants)
    return run_benchmark(checkpoints, dataset, variants, protocol, out, batch=4, repeats=2, eval_batch=8,
                         num_workers=0, label=SMOKE_LABEL, progress=progress)
