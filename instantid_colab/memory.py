"""Measure memory, choose where the models live, and apply that choice to a diffusers pipeline.

On free Colab VRAM (~14.7 GiB free) is larger than RAM (~11 GiB available), so the fp16 weights
(~9.6 GiB) go straight to the GPU and never through RAM; offload is the fallback for smaller GPUs,
chosen from measured free RAM *and* VRAM. `choose_plan` is pure so the decision table is tested
without a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from instantid_colab.settings import SettingsError, check_arguments, size_problems

logger = logging.getLogger(__name__)

GIB = 2**30

# ---------------------------------------------------------------------------------------------
# Budget constants, GiB. Sources: DESIGN.md §5 and reference/memory_colab_anchors.md §4 (fp16
# weight sizes computed from the SDXL/IdentityNet configs); the lead's H100 run capped at 14.75 GiB
# (all on GPU, untiled fp32 decode: 13.9 GiB peak; model offload: 12.2 GiB host RAM). The activation
# and decode rows are estimates to calibrate with the GPU benchmark: change them here only.
WEIGHTS_FP16 = {
    "unet": 4.78,
    "controlnet": 2.33,  # IdentityNet
    "text_encoders": 1.5,  # CLIP ViT-L + OpenCLIP bigG
    "resampler": 0.16,  # InstantID image_proj (82M params), a pipeline attribute, never offloaded
    "ip_layers": 0.63,  # to_k_ip/to_v_ip inside UNet attention: offloaded with the UNet blocks
    "vae": 0.16,
}
STREAMED_PLACEMENTS = ("group_offload", "sequential_offload")  # the UNet in blocks: a method's own layers cannot follow
TEXT_ENCODERS_CPU = 3.0  # on CPU they run in float32 (fp16 matmuls on CPU are slow or missing)
FACE_MODELS_GPU = 0.6  # antelopev2 in onnxruntime CUDA: ~0.4 GiB weights + arena
FACE_MODELS_CPU = 0.4
LARGEST_UNET_GROUP = 2.25  # up_blocks[0], the largest block-level group of group offload
LARGEST_LEAF = 0.05  # largest single layer streamed by sequential offload
GPU_RUNTIME = 0.5  # cuBLAS/cuDNN workspaces and allocator fragmentation
HOST_RUNTIME = 2.5  # libraries, torch/CUDA host memory, gradio: the lead's offload run, 12.2 RSS - 9.6 weights
ADAPTER_LOAD_TRANSIENT = 1.6  # ip-adapter.bin is a 1.69 GB fp32 pickle, read into RAM once
DENOISE_PER_MPIX_SAMPLE = 0.5  # UNet+ControlNet activations per megapixel per sample (CFG = 2 samples)
DECODE_FP32_PER_MPIX = 4.0  # untiled fp32 VAE decode spike per megapixel per decoded image
DECODE_TILED = 1.0  # tiled decode with 512-pixel tiles: independent of the image size
DECODE_FP16_PER_MPIX = DECODE_FP32_PER_MPIX / 2  # the fp16-fixed VAE decodes in half precision
# Room left beside an untiled decode: closer to the cap, torch's allocator frees and retries (H100 under
# the T4 cap, +pose at 14.6 of 14.75 GiB: 3.2 s/image against 2.3 with tiles and two more ControlNets).
UNTILED_DECODE_MARGIN = 1.0
VAE_TILE_PIXELS = 512
VRAM_MARGIN = 0.5
RAM_MARGIN = 0.5

PLACEMENTS = ("gpu", "model_offload", "group_offload", "sequential_offload", "cpu")


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass(frozen=True)
class GpuMemory:
    index: int
    name: str
    total_gib: float
    free_gib: float
    allocated_gib: float  # tensors of this process
    reserved_gib: float  # held by torch's caching allocator
    peak_allocated_gib: float


@dataclass(frozen=True)
class MemorySnapshot:
    ram_total_gib: float
    ram_available_gib: float
    rss_gib: float  # resident set of this process, including mmapped weight files
    rss_anon_gib: float | None  # anonymous resident memory (Linux): what the process really costs
    gpus: tuple[GpuMemory, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        anon = f", anonymous {self.rss_anon_gib:.1f}" if self.rss_anon_gib is not None else ""
        lines = [
            f"RAM: {self.ram_available_gib:.1f} of {self.ram_total_gib:.1f} GiB available; "
            f"this process {self.rss_gib:.1f} GiB resident{anon}"
        ]
        for gpu in self.gpus:
            lines.append(
                f"GPU {gpu.index} {gpu.name}: {gpu.free_gib:.1f} of {gpu.total_gib:.1f} GiB free; "
                f"allocated {gpu.allocated_gib:.1f}, reserved {gpu.reserved_gib:.1f}, peak {gpu.peak_allocated_gib:.1f}"
            )
        if not self.gpus:
            lines.append("GPU: none")
        return "\n".join(lines)

    __str__ = render


def _gib(value: float) -> float:
    return round(value / GIB, 2)


def rss_anon_bytes() -> int | None:
    """RssAnon from /proc/self/status: resident memory that is not a mapped file (Linux only).

    psutil's `memory_full_info().uss` walks every mapping (slow); this line is what we need.
    """
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return None


def _cuda() -> object | None:
    """torch.cuda when torch is importable and a GPU is present, else None."""
    try:
        import torch
    except Exception:
        return None
    return torch.cuda if torch.cuda.is_available() else None


def snapshot() -> MemorySnapshot:
    virtual = psutil.virtual_memory()
    anon = rss_anon_bytes()
    gpus = []
    cuda = _cuda()
    if cuda is not None:
        for index in range(cuda.device_count()):
            free, total = cuda.mem_get_info(index)
            gpus.append(GpuMemory(
                index, cuda.get_device_name(index), _gib(total), _gib(free), _gib(cuda.memory_allocated(index)),
                _gib(cuda.memory_reserved(index)), _gib(cuda.max_memory_allocated(index)),
            ))
    return MemorySnapshot(
        _gib(virtual.total), _gib(virtual.available), _gib(psutil.Process().memory_info().rss),
        None if anon is None else _gib(anon), tuple(gpus),
    )


def cleanup() -> None:
    """Give freed memory back: Python garbage, torch's CUDA cache, and glibc's free heap pages.

    glibc keeps freed heap (e.g. a state dict just copied to the GPU) in the process; malloc_trim
    returns it to the OS so `available` RAM recovers. No library exposes this, hence ctypes.
    """
    gc.collect()
    cuda = _cuda()
    if cuda is not None:
        cuda.empty_cache()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass(frozen=True)
class StageRecord:
    name: str
    seconds: float
    rss_peak_gib: float
    rss_anon_peak_gib: float | None
    rss_after_gib: float
    vram_peak_gib: float | None  # torch peak allocated during the stage (current device)
    vram_after_gib: float | None


class StageRecorder:
    """Peak RAM and VRAM per named stage: `with recorder.stage("load unet"): ...`.

    RAM peaks are sampled by a background thread (psutil RSS and RssAnon every `interval_s`);
    VRAM peaks come from torch's peak statistics, reset when a stage starts. Stages do not nest,
    because resetting the peak inside an inner stage would hide the outer stage's peak.
    """

    def __init__(self, interval_s: float = 0.025, log: Callable[[str], None] | None = None) -> None:
        self.interval_s = interval_s
        self.log = log or logger.info
        self.records: list[StageRecord] = []
        self._active: str | None = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._active is not None:
            raise RuntimeError(f"stage {name!r} started inside stage {self._active!r}; stages do not nest")
        self._active = name
        process = psutil.Process()
        peaks = {"rss": process.memory_info().rss, "anon": rss_anon_bytes()}
        stop = threading.Event()

        def sample() -> None:
            while True:
                peaks["rss"] = max(peaks["rss"], process.memory_info().rss)
                anon = rss_anon_bytes()
                if anon is not None:
                    peaks["anon"] = max(peaks["anon"] or 0, anon)
                if stop.wait(self.interval_s):
                    return

        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        sampler = threading.Thread(target=sample, name=f"memory sampler: {name}", daemon=True)
        started = time.perf_counter()
        sampler.start()
        try:
            yield
        finally:
            stop.set()
            sampler.join()
            self._active = None
            record = StageRecord(
                name=name,
                seconds=round(time.perf_counter() - started, 3),
                rss_peak_gib=_gib(peaks["rss"]),
                rss_anon_peak_gib=None if peaks["anon"] is None else _gib(peaks["anon"]),
                rss_after_gib=_gib(process.memory_info().rss),
                vram_peak_gib=None if cuda is None else _gib(cuda.max_memory_allocated()),
                vram_after_gib=None if cuda is None else _gib(cuda.memory_allocated()),
            )
            self.records.append(record)
            self.log(self._row(record))

    @staticmethod
    def _row(record: StageRecord) -> str:
        def cell(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f}"

        return (
            f"{record.name:<24} {record.seconds:>7.1f} {cell(record.rss_peak_gib):>9} {cell(record.rss_anon_peak_gib):>9} "
            f"{cell(record.rss_after_gib):>9} {cell(record.vram_peak_gib):>10} {cell(record.vram_after_gib):>10}"
        )

    def render(self) -> str:
        header = (
            f"{'stage':<24} {'seconds':>7} {'RAM peak':>9} {'anon peak':>9} {'RAM after':>9} "
            f"{'VRAM peak':>10} {'VRAM after':>10}"
        )
        return "\n".join([header + "   (GiB)", *map(self._row, self.records)])

    def to_list(self) -> list[dict]:
        return [asdict(record) for record in self.records]


# ---------------------------------------------------------------------------------------------
# Choosing a plan


@dataclass(frozen=True)
class MemoryPlan:
    placement: str  # "gpu" | "model_offload" | "group_offload" | "sequential_offload" | "cpu"
    dtype: str  # "float16" on CUDA (sm_75 has no fast bf16), "float32" on cpu
    device: str  # where the denoiser runs
    text_encoder_device: str
    face_device: str  # onnxruntime provider follows it
    vae_tiling: bool
    vae_slicing: bool
    attention: str
    estimated_vram_gib: float
    estimated_ram_gib: float
    why: str
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        lines = [
            f"placement {self.placement} ({self.dtype} on {self.device}); text encoders on {self.text_encoder_device}, "
            f"face analysis on {self.face_device}; VAE tiling {'on' if self.vae_tiling else 'off'}, "
            f"slicing {'on' if self.vae_slicing else 'off'}; attention {self.attention}",
            f"estimated peak: {self.estimated_vram_gib:.1f} GiB VRAM, {self.estimated_ram_gib:.1f} GiB RAM",
            f"why: {self.why}",
        ]
        lines += [f"warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Layout:
    """One candidate arrangement, before it is checked against the machine."""

    placement: str
    text_encoder_device: str
    face_device: str
    vae_tiling: bool


def _activations(width: int, height: int, batch: int, vae_tiling: bool, vae_slicing: bool) -> float:
    """Largest transient on the GPU: denoising (CFG doubles the batch) or the VAE decode after it."""
    mpix = width * height / 1024**2
    denoise = DENOISE_PER_MPIX_SAMPLE * mpix * batch * 2
    decode = DECODE_TILED if vae_tiling else DECODE_FP32_PER_MPIX * mpix * (1 if vae_slicing else batch)
    return max(denoise, decode)


def _estimate(layout: _Layout, width: int, height: int, batch: int) -> tuple[float, float]:
    """(VRAM, RAM) in GiB at the peak for `layout`."""
    w = WEIGHTS_FP16
    te_gpu = w["text_encoders"] if layout.text_encoder_device == "cuda" else 0.0
    te_ram = TEXT_ENCODERS_CPU if layout.text_encoder_device == "cpu" else 0.0
    face_gpu = FACE_MODELS_GPU if layout.face_device == "cuda" else 0.0
    face_ram = FACE_MODELS_CPU if layout.face_device == "cpu" else 0.0
    active = _activations(width, height, batch, layout.vae_tiling, batch > 1) + GPU_RUNTIME
    denoiser = w["unet"] + w["controlnet"] + w["ip_layers"]
    if layout.placement == "gpu":
        vram = denoiser + w["resampler"] + w["vae"] + te_gpu + face_gpu + active
        ram = HOST_RUNTIME + ADAPTER_LOAD_TRANSIENT + te_ram + face_ram
    elif layout.placement == "model_offload":
        # The UNet and the ControlNet both run in every denoising step, so both are on the GPU together;
        # every component is kept in RAM between uses.
        vram = denoiser + w["resampler"] + face_gpu + active
        ram = HOST_RUNTIME + sum(w.values()) + face_ram
    elif layout.placement == "group_offload":
        # UNet and ControlNet stream block by block; text encoders, VAE and Resampler stay put.
        vram = LARGEST_UNET_GROUP + w["resampler"] + w["vae"] + te_gpu + face_gpu + active
        ram = HOST_RUNTIME + denoiser + te_ram + face_ram
    elif layout.placement == "sequential_offload":
        vram = LARGEST_LEAF + w["resampler"] + face_gpu + active
        ram = HOST_RUNTIME + sum(w.values()) + face_ram
    else:  # cpu: float32 everywhere
        vram = 0.0
        ram = HOST_RUNTIME + 2 * sum(w.values()) + face_ram + _activations(width, height, batch, False, batch > 1)
    return round(vram, 2), round(ram, 2)


# Heaviest (fastest) first. Tiling costs less time than moving face analysis or the text encoders
# to the CPU, so it is tried first.
_GPU_LAYOUTS = (
    _Layout("gpu", "cuda", "cuda", False),
    _Layout("gpu", "cuda", "cuda", True),
    _Layout("gpu", "cuda", "cpu", True),
    _Layout("gpu", "cpu", "cpu", True),
)
_OFFLOAD_LAYOUTS = (
    _Layout("model_offload", "cuda", "cuda", True),
    _Layout("model_offload", "cuda", "cpu", True),
    _Layout("group_offload", "cuda", "cuda", True),
    _Layout("group_offload", "cuda", "cpu", True),
    _Layout("group_offload", "cpu", "cpu", True),
    _Layout("sequential_offload", "cuda", "cpu", True),
)

_WHY = {
    "gpu": "All weights fit in free VRAM, so they load straight to the GPU and never pass through RAM.",
    "model_offload": "The UNet and IdentityNet fit on the GPU together but not everything does, and RAM can hold the rest between uses.",
    "group_offload": "The UNet and IdentityNet do not fit on the GPU together, so they stream block by block from RAM.",
    "sequential_offload": "Too little VRAM even for block streaming, so weights stream layer by layer (slow).",
    "cpu": "No CUDA GPU, so everything runs on the CPU in float32.",
}


def _fits(layout: _Layout, ram: float, vram: float | None, width: int, height: int, batch: int) -> bool:
    need_vram, need_ram = _estimate(layout, width, height, batch)
    return vram is not None and need_vram <= vram - VRAM_MARGIN and need_ram <= ram - RAM_MARGIN


def _plan(layout: _Layout, width: int, height: int, batch: int, why: str, warnings: tuple[str, ...] = ()) -> MemoryPlan:
    vram, ram = _estimate(layout, width, height, batch)
    on_gpu = layout.placement != "cpu"
    return MemoryPlan(
        placement=layout.placement,
        dtype="float16" if on_gpu else "float32",
        device="cuda" if on_gpu else "cpu",
        text_encoder_device=layout.text_encoder_device,
        face_device=layout.face_device,
        vae_tiling=layout.vae_tiling,
        vae_slicing=batch > 1,
        attention="sdpa",
        estimated_vram_gib=vram,
        estimated_ram_gib=ram,
        why=why,
        warnings=warnings,
    )


def _why(layout: _Layout) -> str:
    moved = [part for part, device in (("text encoders", layout.text_encoder_device), ("face analysis", layout.face_device))
             if device == "cpu"]
    if layout.placement != "gpu" or not moved:
        return _WHY[layout.placement]
    return _WHY["gpu"][:-1] + f", with {' and '.join(moved)} on the CPU to make room."


def choose_plan(
    ram_available_gib: float,
    vram_free_gib: float | None,
    width: int = 1024,
    height: int = 1024,
    batch: int = 1,
    compute_capability: tuple[int, int] = (7, 5),
) -> MemoryPlan:
    """The fastest placement whose estimated VRAM and RAM peaks fit; pure, so it is testable anywhere.
    SettingsError for a size SDXL cannot make, a batch outside `settings.LIMITS`, or negative memory."""
    ram_available_gib, vram_free_gib, width, height, batch = _checked(ram_available_gib, vram_free_gib, width, height,
                                                                      batch)
    if vram_free_gib is None:
        layout = _Layout("cpu", "cpu", "cpu", False)
        _, need_ram = _estimate(layout, width, height, batch)
        warnings = ["No CUDA GPU: generation on the CPU is very slow (many minutes per image)."]
        if need_ram > ram_available_gib - RAM_MARGIN:
            warnings.append(
                f"float32 SDXL on the CPU needs about {need_ram:.1f} GiB RAM but {ram_available_gib:.1f} GiB is "
                "available: loading will probably crash; use a GPU runtime."
            )
        return _plan(layout, width, height, batch, _WHY["cpu"], tuple(warnings))
    warnings = []
    if compute_capability < (7, 0):
        warnings.append(f"Compute capability {compute_capability[0]}.{compute_capability[1]} has no tensor cores: fp16 runs slowly.")
    for layout in (*_GPU_LAYOUTS, *_OFFLOAD_LAYOUTS):
        if _fits(layout, ram_available_gib, vram_free_gib, width, height, batch):
            if layout.placement == "sequential_offload":
                warnings.append("Sequential offload streams every layer each step: expect several times slower generation.")
            return _plan(layout, width, height, batch, _why(layout), tuple(warnings))
    layout = _OFFLOAD_LAYOUTS[-1]
    vram, ram = _estimate(layout, width, height, batch)
    warnings.append(
        f"Nothing fits: even sequential offload needs about {vram:.1f} GiB VRAM and {ram:.1f} GiB RAM "
        f"({vram_free_gib:.1f} and {ram_available_gib:.1f} available). Lower the resolution or use a larger runtime."
    )
    return _plan(layout, width, height, batch, _WHY["sequential_offload"], tuple(warnings))


def _checked(ram_available_gib, vram_free_gib, width, height, batch) -> list:
    """The planning arguments checked against `settings.LIMITS` (sizes by `settings.size_problems`)."""
    problems = size_problems(width, height)
    try:
        checked = check_arguments(ram_available_gib=(ram_available_gib, "memory_gib"),
                                  vram_free_gib=(vram_free_gib, "memory_gib"), batch=(batch, "num_images"))
    except SettingsError as error:
        problems += error.problems
    if problems:
        raise SettingsError(problems)
    ram, vram, batch = checked
    return [ram, vram, width, height, batch]


def step_down(
    plan: MemoryPlan,
    *,
    ram_available_gib: float | None = None,
    width: int = 1024,
    height: int = 1024,
    batch: int = 1,
) -> MemoryPlan | None:
    """The next lighter plan after an out-of-memory error, or None when there is none.

    gpu -> gpu with text encoders and face analysis on the CPU and VAE tiling -> model offload or
    group offload (the first whose RAM estimate fits) -> sequential offload -> None. RAM is measured
    now when not given: after an OOM it is the number that decides whether offload is safe.
    """
    if ram_available_gib is None:
        ram_available_gib = psutil.virtual_memory().available / GIB
    ram_available_gib, _, width, height, batch = _checked(ram_available_gib, None, width, height, batch)
    current = _Layout(plan.placement, plan.text_encoder_device, plan.face_device, plan.vae_tiling)
    lightest_gpu = _GPU_LAYOUTS[-1]
    if plan.placement == "gpu" and current != lightest_gpu:
        why = ("After running out of GPU memory: the UNet, IdentityNet and VAE stay on the GPU, with text encoders "
               "and face analysis moved to the CPU and the VAE decoded in tiles.")
        return _plan(lightest_gpu, width, height, batch, why, plan.warnings)
    order = ("gpu", "model_offload", "group_offload", "sequential_offload")
    if plan.placement not in order:
        return None
    lighter = order[order.index(plan.placement) + 1:]
    for layout in _OFFLOAD_LAYOUTS:
        if layout.placement in lighter and _estimate(layout, width, height, batch)[1] <= ram_available_gib - RAM_MARGIN:
            return _plan(layout, width, height, batch, "After running out of GPU memory: " + _lower(_why(layout)),
                         plan.warnings)
    return None


def _lower(sentence: str) -> str:
    return sentence[0].lower() + sentence[1:]


def plan_for_this_machine(width: int = 1024, height: int = 1024, batch: int = 1) -> MemoryPlan:
    """choose_plan with this machine's available RAM and the current GPU's free VRAM (in a multi-GPU
    batch each process has set its own GPU as current, so each plans for its own)."""
    cuda = _cuda()
    vram_free = None
    capability = (7, 5)
    if cuda is not None:
        index = cuda.current_device()
        free, _ = cuda.mem_get_info(index)
        vram_free = free / GIB
        capability = cuda.get_device_capability(index)
    return choose_plan(psutil.virtual_memory().available / GIB, vram_free, width, height, batch, capability)


# ---------------------------------------------------------------------------------------------
# Extra ControlNets (pose / canny / depth) next to the loaded pipeline

ANNOTATOR_RAM = {"pose": 0.4, "depth": 0.15, "canny": 0.0}  # fp32 on the CPU while annotating, freed after
CONTROL_PLACES = ("gpu", "offload", "cpu")


@dataclass(frozen=True)
class ControlPlacement:
    kind: str
    variant: str  # "full" | "small" ...: which checkpoint of that kind
    place: str  # "gpu": resident; "offload": kept in RAM, streamed to the GPU layer by layer; "cpu": no GPU
    gib: float  # its fp16 weights

    def render(self) -> str:
        where = {"gpu": "on the GPU", "offload": "in RAM, streamed to the GPU each step (slower)", "cpu": "on the CPU"}
        return f"{self.kind} ControlNet ({self.variant}, {self.gib:.2f} GiB) {where[self.place]}"


def plan_controls(plan: MemoryPlan, options: dict[str, list[tuple[str, float]]], vram_available_gib: float | None,
                  ram_available_gib: float, width: int = 1024, height: int = 1024, batch: int = 1,
                  ) -> tuple[ControlPlacement, ...]:
    """Variant and place of each extra ControlNet, in the order given; pure, so it is tested anywhere.

    `options[kind]` lists (variant, fp16 GiB) heaviest first. `vram_available_gib` is what the GPU has
    left beside the loaded pipeline (None: no GPU). The activations of a generation stay reserved.
    Heaviest variant resident on the GPU first; then the lightest variant resident; then the lightest
    streamed from RAM. Raises MemoryError naming the control when RAM cannot hold it either.
    """
    ram_available_gib, vram_available_gib, width, height, batch = _checked(ram_available_gib, vram_available_gib,
                                                                           width, height, batch)
    headroom = _activations(width, height, batch, plan.vae_tiling, batch > 1) + GPU_RUNTIME + VRAM_MARGIN
    vram_left = None if vram_available_gib is None or plan.placement != "gpu" else vram_available_gib - headroom
    ram_left = ram_available_gib - RAM_MARGIN - max((ANNOTATOR_RAM.get(kind, 0.0) for kind in options), default=0.0)
    placements = []
    for kind, variants in options.items():
        lightest = variants[-1]
        if vram_available_gib is None:
            placements.append(ControlPlacement(kind, variants[0][0], "cpu", variants[0][1]))
            continue
        resident = next(((name, gib) for name, gib in variants if vram_left is not None and gib <= vram_left), None)
        if resident is not None:
            vram_left -= resident[1]
            placements.append(ControlPlacement(kind, resident[0], "gpu", resident[1]))
        elif lightest[1] <= ram_left:
            ram_left -= lightest[1]
            placements.append(ControlPlacement(kind, lightest[0], "offload", lightest[1]))
        else:
            raise MemoryError(
                f"Not enough memory for the {kind} ControlNet: its lightest variant needs {lightest[1]:.2f} GiB, and "
                f"neither the GPU ({max(vram_left or 0.0, 0.0):.1f} GiB left beside the loaded models) nor RAM "
                f"({max(ram_left, 0.0):.1f} GiB left) has it. Use fewer controls, or a smaller output size.")
    return tuple(placements)


def identity_outlook(plan: MemoryPlan) -> dict[str, str]:
    """For `doctor`: what each identity method (`engines.METHODS`) adds under `plan` and where, before anything loads."""
    from instantid_colab import engines

    outlook = {}
    where = "the GPU" if plan.placement == "gpu" else "the CPU, moving with the UNet" if plan.placement == \
        "model_offload" else "the CPU"
    for name, method in engines.METHODS.items():
        if not method.download_gb:
            outlook[name] = f"{method.title}, loaded with the pipeline (the default)"
        elif plan.placement in STREAMED_PLACEMENTS and not method.streamed:
            outlook[name] = (f"not available under {plan.placement} (the UNet streams in blocks; its layers would not "
                             "follow)")
        else:
            outlook[name] = (f"{method.layers_gib:.2f} GiB of layers beside the UNet on {where}; {method.encoders} "
                             f"{method.encoders_gib:.2f} GiB on the CPU, on the GPU only while they encode (loaded "
                             "the first time the method is asked for)")
    return outlook


def controls_outlook(plan: MemoryPlan, combinations: dict[str, dict[str, list[tuple[str, float]]]],
                     vram_free_gib: float | None, ram_available_gib: float) -> dict[str, list[ControlPlacement] | str]:
    """For `doctor`: where each combination of extra ControlNets would go once the pipeline is loaded
    (estimated from the plan, before anything loads), or why it cannot run."""
    activations = _activations(1024, 1024, 1, plan.vae_tiling, False) + GPU_RUNTIME
    vram_left = None if vram_free_gib is None else max(0.0, vram_free_gib - (plan.estimated_vram_gib - activations))
    ram_left = max(0.0, ram_available_gib - plan.estimated_ram_gib + HOST_RUNTIME)
    outlook: dict[str, list[ControlPlacement] | str] = {}
    for name, options in combinations.items():
        try:
            outlook[name] = list(plan_controls(plan, options, vram_left, ram_left))
        except MemoryError as error:
            outlook[name] = str(error)
    return outlook


def untiled_decode_fits(pixels: int, images: int, dtype_bytes: int) -> bool:
    """Whether an untiled VAE decode of `images` pictures of `pixels` each fits in the VRAM free now.

    The plan turns tiling on when the decode peak might not fit beside everything else at the worst
    moment; after denoising, the activations are free again, and an untiled decode is faster (tiles
    overlap and are blended on the host). No GPU: False (tiling settings stay as they are).
    """
    available = vram_available_gib()
    per_mpix = DECODE_FP16_PER_MPIX if dtype_bytes == 2 else DECODE_FP32_PER_MPIX
    return available is not None and per_mpix * pixels / 1024**2 * images <= available - UNTILED_DECODE_MARGIN


def vram_available_gib(index: int | None = None) -> float | None:
    """What this process can still allocate on GPU `index` (default: the current one): free memory plus
    torch's cached-but-unused blocks, within a `set_per_process_memory_fraction` cap. None without a GPU."""
    cuda = _cuda()
    if cuda is None:
        return None
    index = cuda.current_device() if index is None else index
    free, total = cuda.mem_get_info(index)
    reserved, allocated = cuda.memory_reserved(index), cuda.memory_allocated(index)
    fraction = cuda.get_per_process_memory_fraction(index) if hasattr(cuda, "get_per_process_memory_fraction") else 1.0
    return (min(free, fraction * total - reserved) + reserved - allocated) / GIB


# ---------------------------------------------------------------------------------------------
# Applying a plan to a loaded diffusers pipeline


def _effective_vae_tiling(vae: object) -> list[str]:
    """Enable tiling and shrink the tile so it also applies at 1024² (diffusers tiles only when the
    latent is strictly larger than `sample_size/8`, which for SDXL is exactly 1024²)."""
    notes = []
    vae.enable_tiling()
    if isinstance(getattr(vae, "tile_sample_min_size", None), int) and hasattr(vae, "tile_latent_min_size"):
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if vae.tile_sample_min_size > VAE_TILE_PIXELS:
            vae.tile_sample_min_size = VAE_TILE_PIXELS
            vae.tile_latent_min_size = VAE_TILE_PIXELS // factor
            notes.append(f"VAE tiles lowered to {VAE_TILE_PIXELS} px so tiling is effective at 1024²")
    else:
        notes.append("this VAE has no tile-size attributes; tiling applies only above its sample size")
    return notes


def _controlnets(pipe: object) -> list[object]:
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is None:
        return []
    return list(getattr(controlnet, "nets", [controlnet]))


def _text_encoders(pipe: object) -> list[object]:
    return [encoder for encoder in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if encoder is not None]


def apply(plan: MemoryPlan, pipe: object) -> list[str]:
    """Put a loaded diffusers SDXL ControlNet pipeline into `plan`; returns what was done.

    Feature-detected so it works from diffusers 0.30 (pipeline-level `enable_vae_tiling`) to 0.40+
    (only `pipe.vae.enable_tiling`). For `gpu` no weights move unless a component is on the wrong
    device (a plan from `step_down` after an OOM).
    """
    import torch

    notes: list[str] = []
    vae = pipe.vae
    if plan.vae_tiling:
        if hasattr(vae, "enable_tiling"):
            notes += ["VAE tiling on", *_effective_vae_tiling(vae)]
        else:
            pipe.enable_vae_tiling()
            notes.append("VAE tiling on (pipeline-level API)")
    if plan.vae_slicing:
        (vae.enable_slicing if hasattr(vae, "enable_slicing") else pipe.enable_vae_slicing)()
        notes.append("VAE slicing on")

    text_dtype = torch.float32 if plan.text_encoder_device == "cpu" else getattr(torch, plan.dtype)
    if plan.placement in ("gpu", "group_offload", "cpu"):
        for encoder in _text_encoders(pipe):
            weight = next(encoder.parameters())
            if weight.device.type != plan.text_encoder_device or weight.dtype != text_dtype:
                encoder.to(plan.text_encoder_device, dtype=text_dtype)
                notes.append(f"{type(encoder).__name__} moved to {plan.text_encoder_device} ({text_dtype})")

    if plan.placement == "model_offload":
        pipe.enable_model_cpu_offload()
        notes.append("model CPU offload")
    elif plan.placement == "sequential_offload":
        pipe.enable_sequential_cpu_offload()
        notes.append("sequential CPU offload")
    elif plan.placement == "group_offload":
        notes += _group_offload(pipe, plan)
    return notes


def _group_offload(pipe: object, plan: MemoryPlan) -> list[str]:
    """Block-level group offload of the UNet and ControlNet(s) only.

    Not the VAE: block-level group offload breaks the SDXL VAE (diffusers #12319). No CUDA streams:
    with streams each group is pinned in a second RAM copy, which free-Colab RAM cannot hold.
    """
    denoisers = [pipe.unet, *_controlnets(pipe)]
    if not all(hasattr(model, "enable_group_offload") for model in denoisers):
        pipe.enable_sequential_cpu_offload()
        return ["this diffusers has no group offload: using sequential CPU offload instead"]
    for model in denoisers:
        model.to("cpu")
        model.enable_group_offload(onload_device=plan.device, offload_device="cpu", offload_type="block_level",
                                   num_blocks_per_group=1)
    pipe.vae.to(plan.device)
    return [f"group offload (block level) on {', '.join(type(m).__name__ for m in denoisers)}; VAE stays on {plan.device}"]

