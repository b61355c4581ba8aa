"""Small helpers that keep the notebooks' cells to one or two calls.

Every branch a notebook would need (Colab or not, smoke or real, Drive or not, upload or path)
lives here, so each cell stays a short, readable call into the package. No generation or model
logic lives here: that belongs to `pipeline`, `weights`, `memory` and `pose`.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instantid_colab.environment import in_colab

if TYPE_CHECKING:
    from PIL import Image

    from instantid_colab.batch import BatchReport
    from instantid_colab.bench.report import BenchSummary
    from instantid_colab.memory import MemoryPlan, StageRecorder
    from instantid_colab.pipeline import GenerationResult, InstantIDSession
    from instantid_colab.pose.benchmark import BenchmarkResult
    from instantid_colab.weights import WeightPaths

DRIVE_MOUNT_POINT = Path("/content/drive")
SWITCH_RUNTIME_HINT = "Runtime > Change runtime type > Hardware accelerator: T4 GPU > Save, then Run all again"
SMOKE_SWAP_STEPS = 4  # the smoke swap's steps: its 1024 px crop costs the tiny models a second a step on the CPU


class NoGPUError(RuntimeError):
    """The runtime has no CUDA GPU, and this notebook needs one outside smoke mode."""


def check_gpu(smoke: bool = False) -> None:
    """Print which GPU this runtime has; without one, stop with how to switch (smoke mode needs none)."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        line = f"GPU: {props.name}, {props.total_memory / 2**30:.1f} GiB"
    elif smoke:
        line = "GPU: none (smoke: random weights run on the CPU, no GPU needed)"
    else:
        where = "In Colab: " if in_colab() else "On Colab: "
        raise NoGPUError(
            "This runtime has no CUDA GPU, and this notebook needs one (a free T4 is enough). "
            f"{where}{SWITCH_RUNTIME_HINT}."
        )
    print(line)


def mount_drive(use_drive: bool, folder: str = "instantid-colab") -> Path | None:
    """Mount Google Drive and return `MyDrive/<folder>` (created), or None when Drive is off or absent.

    Weights cached there survive the Colab VM, so the next session skips the ~10 GB download.
    """
    if not use_drive:
        print("Google Drive: not used (downloads go to this runtime's disk and vanish with it)")
        return None
    if not in_colab():
        print("Google Drive: only available inside Colab; using this machine's disk")
        return None
    from google.colab import drive

    drive.mount(str(DRIVE_MOUNT_POINT))
    path = DRIVE_MOUNT_POINT / "MyDrive" / folder
    path.mkdir(parents=True, exist_ok=True)
    print(f"Google Drive cache: {path}")
    return path


def install_dependencies(smoke: bool = False, upgrade: str = "") -> None:
    """Add what this runtime lacks through the package's installer, changing nothing Colab installed; `upgrade`
    names installed packages to upgrade on purpose (comma-separated; never torch or numpy).

    Smoke mode only plans (a dry run), so CI changes nothing. Stops "Run all" when pip failed, a package is too
    old, or the runtime must be restarted, because the cells after it would fail less clearly.
    """
    from instantid_colab import environment, installer

    names = [name.strip() for name in upgrade.split(",") if name.strip()]
    refused = installer.refusals(names, environment.installed_versions())
    if refused:
        raise ValueError("; ".join(refused))
    result = installer.install(dry_run=smoke, upgrade=names)
    print(("smoke: dry run, nothing installed\n" if smoke else "") + result.render())
    if result.error or result.problems or result.outdated:
        raise RuntimeError("Installing the libraries failed (details above). Fix what it says, then Run all again.")
    if result.restart_needed:
        raise RuntimeError("Restart the runtime (Runtime > Restart session), then Run all again: "
                           "a library this runtime had already imported was upgraded.")


def doctor() -> None:
    """Print the environment, memory and memory-plan report (`python -m instantid_colab doctor`)."""
    from instantid_colab.cli import main

    main(["doctor"])


def fetch_weights(smoke: bool, drive_dir: Path | None = None, base_model: str = "",
                  work_dir: str | Path = "outputs") -> WeightPaths:
    """Real weights from the hub (into Drive when it is mounted, with progress bars), or tiny random ones in smoke mode."""
    if smoke:
        from instantid_colab.smoke import SMOKE_LABEL, build_smoke_weights

        paths = build_smoke_weights(Path(work_dir) / "smoke-weights")
        print(f"Weights: {SMOKE_LABEL} (tiny models with the real structure, nothing downloaded)")
        return paths
    from instantid_colab.weights import DEFAULT_BASE, ensure_weights

    return ensure_weights(base=base_model or DEFAULT_BASE, drive=drive_dir is not None)


# One loaded pipeline per kernel: re-running a cell must not load a second ~10 GB copy next to the
# first (that is an out-of-memory crash on a T4), so the same weights and plan return the same session.
# Other weights or another plan replace it (the notebook's `session` variable still holds the old one
# until the cell finishes, so switching models mid-session may need Runtime > Restart session).
_loaded: dict[tuple, InstantIDSession] = {}


def load_session(weights: WeightPaths, plan: MemoryPlan | None = None,
                 recorder: StageRecorder | None = None) -> InstantIDSession:
    """Build the InstantID session once per kernel (`pipeline.load_pipeline`), reuse it on re-runs."""
    from instantid_colab.pipeline import load_pipeline

    key = (weights, plan)
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = load_pipeline(weights, plan=plan, recorder=recorder)
    else:
        print("Models already loaded in this runtime: reusing them")
    return _loaded[key]


def face_image(path: str = "", smoke: bool = False, extras: dict[str, Any] | None = None) -> Image.Image | None:
    """The face photo: `path` if given, else an upload box in Colab, else (smoke) the bundled sample face.
    None when `extras` (what `extras()` returned) holds people: their photos replace it."""
    from instantid_colab.images import open_image

    if extras and extras.get("people"):
        print(f"People: {len(extras['people'])} persons; FACE_IMAGE is not used")
        return None
    if path:
        return open_image(path, "face photo")
    if smoke:
        from instantid_colab.smoke import sample_face_image

        return sample_face_image()
    if in_colab():
        from google.colab import files

        uploaded = files.upload()  # also saved under its name in the working folder
        if uploaded:
            return open_image(next(iter(uploaded)), "face photo")
    raise FileNotFoundError("No face photo: upload one when asked, or set FACE_IMAGE to the path of a photo.")


def output_size(size: str = "Auto", smoke: bool = False) -> tuple[int | None, int | None]:
    """The form's size preset (`settings.SIZE_PRESETS`) as (width, height); "Auto": the official rule follows the photo."""
    from instantid_colab.settings import SIZE_PRESETS
    from instantid_colab.smoke import SMOKE_SIZE

    if smoke:
        print(f"Output size: {SMOKE_SIZE}x{SMOKE_SIZE} (smoke: random weights on the CPU)")
        return SMOKE_SIZE, SMOKE_SIZE
    if size == "Auto":
        return None, None
    return SIZE_PRESETS[size]


def extras(pose: str = "", canny: str = "", depth: str = "", control_strength: float = 0.6, lora: str = "",
           lora_scale: float = 0.8, start_photo: str = "", start_strength: float = 0.8, people: str = "",
           people_order: str = "", smoke: bool = False) -> dict[str, Any]:
    """The optional form fields as `pipeline.generate` keywords: a control per photo given (a photo of a
    body for pose, any photo for canny edges and depth), a LoRA (hub id or file), a start photo (img2img),
    several people (`a.jpg; b.jpg+b2.jpg`: 2 to 4 persons, each one or more photos; `people_order` places them
    on the pose photo's faces, e.g. "2,1").
    Smoke mode fills the empty pose and LoRA fields with the sample face and the tiny LoRA, so CI exercises
    the extra ControlNet and LoRA paths too."""
    from instantid_colab.controls import Control
    from instantid_colab.images import open_image
    from instantid_colab.loras import SMOKE_LORA, Lora

    layout = pose  # with people: the photo whose faces place them
    if smoke:
        from instantid_colab.smoke import sample_face_image

        pose, lora = pose or sample_face_image(), lora or SMOKE_LORA
    photos = {"pose": pose, "canny": canny, "depth": depth}
    chosen = {
        "controls": [Control(kind, photo, control_strength) for kind, photo in photos.items() if photo],
        "loras": [Lora(lora.strip(), lora_scale)] if lora.strip() else [],
        "init_image": open_image(start_photo, "start photo") if start_photo else None,
        "init_strength": start_strength,
    }
    if people.strip():
        from instantid_colab.people import from_text

        cast, order = from_text([part for part in people.split(";") if part.strip()], order=people_order,
                                has_layout=bool(layout))
        chosen.update(people=cast, order=order, pose_image=open_image(layout, "layout photo") if layout else None)
    used = [c.kind for c in chosen["controls"]] + [f"LoRA {x.name}" for x in chosen["loras"]]
    used += ["start photo"] if start_photo else []
    used += [f"{len(chosen['people'])} people"] if chosen.get("people") else []
    print(f"Extras: {', '.join(used) or 'none'}" + (" (smoke: sample pose photo, tiny LoRA)" if smoke else ""))
    return chosen


def batch(session: InstantIDSession, manifest: str = "", out: str | Path = "outputs/batch",
          smoke: bool = False) -> BatchReport | None:
    """Make every row of a CSV/JSONL manifest with the loaded session (resumable: run again to finish).
    Smoke mode without a manifest writes a two-row sample one under `out`."""
    from instantid_colab import batch as batches

    out = Path(out)
    if not manifest and smoke:
        out.mkdir(parents=True, exist_ok=True)
        manifest = out / "smoke-manifest.jsonl"
        rows = [{"prompt": "a portrait in a garden", "seed": 1}, {"prompt": "a portrait at night", "seed": 2}]
        manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    if not manifest:
        print("No MANIFEST: give a CSV or JSONL file, one image per row (columns: "
              f"{', '.join(batches.COLUMNS)}); see the README's 'Many images' section.")
        return None
    report = batches.run(session, batches.prepare_rows(manifest, smoke=smoke), out)
    print((f"[{session.label}] " if session.label else "") + report.render())
    sheet = out / batches.CONTACT_SHEET
    if sheet.is_file():
        show_image(sheet)
    return report


def generate(session: InstantIDSession, face: Image.Image | None, prompt: str, refine_face: float = 0.0,
             live_preview: bool = False, **settings: Any) -> GenerationResult:
    """`pipeline.generate` with the form's settings (a live TAESDXL preview in the cell's output when asked),
    then the refine pass when `refine_face` > 0 (its strength)."""
    from instantid_colab import pipeline, refine
    from instantid_colab.settings import check as check_settings

    check_settings({"identity": settings.get("identity"), "refine_face": refine_face,
                    "steps": settings.get("steps")})  # before the image, not after
    if live_preview:
        from IPython.display import display

        shown = display(None, display_id=True)
        settings["preview"] = lambda step, total, image: shown.update(image)
    result = pipeline.generate(session, face, prompt, **settings)
    if refine_face:
        refine.refine_faces(session, result, refine_face, face_image=face,
                            extra_face_images=settings.get("extra_face_images", ()), people=settings.get("people", ()))
    return result


def swap(session: InstantIDSession, target: str = "", face: str = "", which: int = 0, strength: float = 0.7,
         out: str | Path = "outputs/swap.png", smoke: bool = False) -> Path | None:
    """Give a face of the `target` photo the identity of the `face` photo (`refine.swap`), save and show it.
    Smoke mode without photos uses a drawn photo with one smoke face and the sample face."""
    from instantid_colab import refine
    from instantid_colab.png_metadata import save_png

    steps = 30
    if smoke and not (target or face):
        from instantid_colab.smoke import sample_face_image

        target, face = sample_face_image(640, face_color=(170, 200, 240)), sample_face_image()
        steps = SMOKE_SWAP_STEPS
        print(f"Face swap: the drawn smoke photo, {steps} steps (smoke: the tiny models repaint the 1024 px crop on "
              "the CPU, about a second a step)")
    if not (target and face):
        print("No TARGET_PHOTO or SWAP_FACE: give both to put the person into the photo.")
        return None
    result = refine.swap(session, target, face, which=which or None, strength=strength, steps=steps)
    path = save_png(result.image, out)
    print((f"{result.label}\n" if result.label else "") + f"face at {result.face_box}, strength {result.strength}: "
          f"{result.likeness.render()}; saved {path}")
    show_image(path)
    return path


def identity_benchmark(session: InstantIDSession, faces: str, grid: str = "", prompts: str = "protocol",
                       seeds: int = 4, out: str | Path = "outputs/identity_bench",
                       smoke: bool = False) -> tuple[BenchSummary, dict[str, Path]]:
    """`python -m instantid_colab bench` with the loaded session: plan (every setting checked first), make and
    score what `out` lacks (rerun the cell to finish after a disconnect), and write the table, plot and sheet.
    Smoke mode benchmarks two drawn smoke people written under `out` (FACES is not read)."""
    from instantid_colab.bench import run as bench

    if smoke:
        plan = bench.plan_smoke_people(out, prompts, grid or None, seeds)
    elif not Path(faces).is_dir():
        raise _missing_folder("FACES", faces, " Make it, with one photo per person or one folder of photos per person.")
    else:
        plan = bench.plan(faces, prompts, grid or None, seeds)
    print(plan.describe())
    made, summary, written = bench.run(session, plan, out)
    print((f"[{session.label}] " if session.label else "") + made.render())
    return summary, written


def show_text(text: str, label: str | None = None) -> None:
    """Print a fixed-width table, under the smoke label when its numbers come from random weights."""
    print(f"{label}\n{text}" if label else text)


def show_markdown(text: str) -> None:
    """Render a markdown table or note in the notebook (plain text elsewhere)."""
    from IPython.display import Markdown, display

    display(Markdown(text))


def show_result(result: GenerationResult) -> None:
    """Show the generated images and the face keypoints used (under the smoke label when it applies),
    then the seed that reproduces them."""
    from IPython.display import display

    if result.label:
        print(result.label)
    for index in result.best_first():
        display(result.images[index])
        print(f"image {index + 1}: {result.likeness[index].render()}")
    display(result.kps_image)
    print(f"seed {result.seed}, {result.seconds:.1f} s, plan: {result.plan.placement}")
    for notice in result.notices:
        print(notice)


DISPLAYS = ("in this notebook", "share link")
FREE_TIER_NOTE = ("Colab's free tier does not allow driving a notebook mainly through a web UI, and has cut off "
                  "sessions that serve a public Gradio link; 'in this notebook' stays inside the notebook.")
APP_HEIGHT = 900


def launch_app(session: InstantIDSession, smoke: bool = False, auth: str = "",
               display: str = "in this notebook") -> str:
    """Start the gradio app and return its address.

    `display`: "in this notebook" serves it through the notebook's own port proxy (Colab: only your
    signed-in browser reaches it, so no login is needed and no public tunnel is opened); "share link"
    opens a public gradio.live link behind a login: `auth` ("user:password"; empty: a random user and
    password, printed beside the link). In smoke
    mode (CI) the share link is skipped (no network): the app is served locally, shown, fetched once to
    prove it answers, and closed, so "Run all" finishes instead of leaving a server running.
    """
    from instantid_colab.app import launch

    if display not in DISPLAYS:
        raise ValueError(f"DISPLAY {display!r} is not one of: {', '.join(DISPLAYS)}")
    share = display == "share link" and not smoke
    if display == "share link" and smoke:
        print("Share link skipped (smoke: offline); serving the app locally instead.")
    elif display == "in this notebook" and auth:
        print("APP_LOGIN is for the share link; the in-notebook view is reachable only from this notebook.")
    # inline=False: the display is ours (`show_in_notebook`), not gradio's guess about the notebook it runs in.
    launched = launch(session, share=share, auth=(auth or None) if share else None, block=False, inline=False)
    url = launched.share_url or launched.local_url
    if share:
        print(f"Open the app: {url}" + (f"\nNote: {FREE_TIER_NOTE}" if in_colab() else ""))
    else:
        show_in_notebook(launched.local_url)
    if smoke:
        try:
            with urllib.request.urlopen(launched.local_url, timeout=30) as response:
                print(f"App answered HTTP {response.status} at {launched.local_url} (smoke: random weights; now closed)")
        finally:
            launched.app.close()
    return url


def show_in_notebook(url: str, height: int = APP_HEIGHT) -> None:
    """Show a locally served app in the cell's output: in Colab through Colab's port proxy (its documented
    `serve_kernel_port_as_iframe`, plus a link that opens it in a browser tab), elsewhere as an iframe."""
    port = urllib.parse.urlsplit(url).port
    if in_colab():
        from google.colab import output

        output.serve_kernel_port_as_window(port, anchor_text="Open the app in a new browser tab")
        output.serve_kernel_port_as_iframe(port, height=height)
        return
    from IPython.display import IFrame, display

    print(f"The app: {url}")
    display(IFrame(url, width="100%", height=height))


def show_image(path: str | Path) -> None:
    """Display an image file (the benchmark plot) in the notebook."""
    from IPython.display import Image as ImageFile, display

    display(ImageFile(filename=str(path)))


def pose_benchmark(smoke: bool, checkpoints: str, h36m: str, variants: str = "XS,S,M,L", protocol: int = 2,
                   out: str | Path = "outputs/convnextpose") -> BenchmarkResult:
    """Run (or resume) the ConvNeXtPose benchmark; smoke mode uses random released-format checkpoints
    and a synthetic Human3.6M written under `out`, with short timings.

    Variants already finished with the same settings are read back from `out`.
    """
    from instantid_colab.pose import benchmark, get_variant

    names = [get_variant(name.strip()).name for name in variants.split(",") if name.strip()]
    if smoke:
        return benchmark.run_smoke(out, names, protocol)
    for what, folder in (("CHECKPOINTS", checkpoints), ("H36M", h36m)):
        if not Path(folder).is_dir():
            raise _missing_folder(what, folder)
    return benchmark.run_benchmark(checkpoints, h36m, names, protocol, out)


def _missing_folder(what: str, folder: str, advice: str = "") -> FileNotFoundError:
    """A form's folder that does not exist, with what to do (a Drive path: mount Drive first)."""
    hint = " Turn USE_DRIVE on, or check the path in Drive's file browser." if str(folder).startswith(
        str(DRIVE_MOUNT_POINT)) else ""
    return FileNotFoundError(f"{what} folder {folder} does not exist.{advice}{hint}")
