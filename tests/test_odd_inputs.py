"""Odd inputs through the command lines, as a new user types them: each gets its exact answer.

Every case states the exit code (0 done, 1 the run could not do what was asked, 2 a wrong command line
or a value out of range, 3 our bug, 130 Ctrl-C), the message, and that nothing in the working folder
changed unless the run succeeded. The first 18 cases are the ones the issue saw fail; the rest are ours.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from instantid_colab import cli, memory, pipeline, smoke
from instantid_colab.pose import cli as pose_cli
from instantid_colab.settings import SettingsError
from tests.pictures import png_header_only

QUICK = ["--smoke", "--steps", "1", "--seed", "3"]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def face_png(path: Path) -> Path:
    smoke.sample_face_image().save(path)
    return path


def face_16bit(path: Path) -> Path:
    """The sample face as a 16-bit grey PNG: Pillow's own RGB conversion turns it white (no face)."""
    grey = np.asarray(smoke.sample_face_image().convert("L"), np.uint16) * 257
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode in ("I;16", "I")  # Pillow < 10 opens 16-bit grey as "I"
    return path


def truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    smoke.sample_face_image().save(buffer, format="JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def text_as_jpg(path: Path) -> Path:
    path.write_text("this is a shopping list, not a photo")
    return path


class Evil:
    """Pickles into a call of os.system: what weights_only=True exists to refuse."""

    def __reduce__(self):
        import os

        return os.system, ("echo owned",)


def evil_pickle(path: Path) -> Path:
    torch.save({"network": {"x": torch.zeros(1)}, "hook": Evil()}, path)
    return path


def face_jpeg(path: Path, side: int) -> Path:
    """The smoke face as a `side` x `side` JPEG (8000: 64 MP, as phones write them)."""
    smoke.sample_face_image().resize((side, side), Image.NEAREST).save(path, quality=90)
    return path


def damaged_smoke_weights(relative: str, text: str | None = None) -> Callable[[Path], str]:
    """A copy of the smoke weights beside the work folder with one file damaged (replaced by `text`, or cut in
    half); returns the INSTANTID_WEIGHTS value that makes `--smoke` use the copy."""
    def make(folder: Path) -> str:
        root = folder.parent / "weights"
        shutil.copytree(smoke.default_smoke_root(), root / "smoke")
        damaged = root / "smoke" / relative
        if text is not None:
            damaged.write_text(text)
        else:
            damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
        return str(root)
    return make


def downloaded(folder: Path) -> Path:
    """Every file `download` fetches, present and valid but tiny, under folder/w (so the 2.5 GB IdentityNet is not
    the size it must be)."""
    from instantid_colab import weights

    root = folder / "w"
    files = [s.local_dir / f for s in weights.sources(root) for f in s.files]
    files += [root / "faces" / weights.ANTELOPEV2_DIR / name for name in weights.ANTELOPEV2_FILES]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            save_file({"w": torch.zeros(4)}, str(path))
        else:
            path.write_text("{}")
    return root


@dataclass
class Case:
    argv: Callable[[Path], list[str]]  # builds the command line in a fresh folder
    code: int
    message: str  # regex searched in stderr (errors) or stdout (successes)
    main: Callable = cli.main
    check: Callable[[Path], None] | None = None  # extra assertions on the folder after a success
    changes_files: bool = False
    env: dict = field(default_factory=dict)  # a value may be a function of the work folder


def out(folder: Path) -> str:
    return str(folder / "out" / "x.png")


def existing_output(folder: Path) -> list[str]:
    (folder / "out").mkdir()
    face_png(folder / "out" / "x.png")  # yesterday's picture
    return [*QUICK, "--out", out(folder)]


def kept_and_renamed(folder: Path) -> None:
    assert snapshot(folder)["out/x.png"] == hashlib.sha256(_face_bytes()).hexdigest()
    assert json.loads(Image.open(folder / "out" / "x_2.png").text["instantid"])["seed"] == 3


def _face_bytes() -> bytes:
    buffer = io.BytesIO()
    smoke.sample_face_image().save(buffer, format="PNG")
    return buffer.getvalue()


def overwritten(folder: Path) -> None:
    assert "instantid" in Image.open(folder / "out" / "x.png").text
    assert not (folder / "out" / "x_2.png").exists()


def written(*names: str) -> Callable[[Path], None]:
    def check(folder: Path) -> None:
        for name in names:
            assert json.loads(Image.open(folder / name).text["instantid"])["seed"] == 3, name
    return check


def _manifest(folder: Path, face: str) -> Path:
    if face == "a.png":
        face_png(folder / "a.png")
    (folder / "m.jsonl").write_text(json.dumps({"face": face, "prompt": "x", "steps": 1}) + "\n")
    return folder / "m.jsonl"


_LISTENING: list = []  # sockets kept open while the test that asked for a taken port runs


def _taken_port() -> int:
    import socket

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    _LISTENING.append(listening)
    return listening.getsockname()[1]


def _filled(path: Path, value: int) -> Path:
    Image.new("L", (256, 256), value).save(path)
    return path


def _interval_not_recorded(folder: Path) -> None:
    stored = json.loads(Image.open(folder / "out" / "x.png").text["instantid"])
    assert stored["guidance_interval"] is None and stored["speed"]["name"] == "lightning-4"


def hostile_smoke_weights(relative: str) -> Callable[[Path], str]:
    """A copy of the smoke weights beside the work folder with one weights file replaced by a pickle that would run
    code; returns the INSTANTID_WEIGHTS value that makes `--smoke` use the copy."""
    def make(folder: Path) -> str:
        root = folder.parent / "weights"
        shutil.copytree(smoke.default_smoke_root(), root / "smoke")
        evil_pickle(root / "smoke" / relative)
        return str(root)
    return make


def _people(folder: Path, *names: str) -> Path:
    people = folder / "faces"
    people.mkdir(exist_ok=True)
    for name in names or ("ann",):
        face_png(people / f"{name}.png")
    return people


def _second_bench_with_other_prompts(folder: Path) -> list[str]:
    """`bench` into a folder, then again into it with another prompt: the second must keep the first's pictures."""
    common = ["bench", "--smoke", "--faces", str(_people(folder)), "--out", str(folder / "b")]
    assert cli.main([*common, "--prompts", str(_lines(folder / "one.txt", "a photo of a person"))]) == 0
    return [*common, "--prompts", str(_lines(folder / "two.txt", "a painting of a person"))]


def _every_picture_is_its_lines(folder: Path) -> None:
    from instantid_colab import batch

    lines = batch.results(folder / "b")
    assert len(lines) == 2
    for line in lines:
        (picture,) = batch.pictures(folder / "b", line)
        stored = json.loads(Image.open(picture).text["instantid"])
        assert stored["user_prompt"] == line["settings"]["user_prompt"]


def _pictures_of_size(side: int) -> Callable[[Path], None]:
    def check(folder: Path) -> None:
        from instantid_colab import batch

        (line,) = batch.results(folder / "runs")
        assert Image.open(batch.pictures(folder / "runs", line)[0]).size == (side, side)
    return check


def _results_with(folder: Path, *lines: str) -> Path:
    folder.mkdir()
    (folder / "results.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _glued_results(folder: Path) -> list[str]:
    """A row made, then results.jsonl as an older version left it: a line cut off by a killed run, and the next
    record appended to the same line. The row's record is still there: it is not made again."""
    argv = ["batch", str(_manifest(folder, "a.png")), "--smoke", "--out", str(folder / "runs")]
    assert cli.main(argv) == 0
    results = folder / "runs" / "results.jsonl"
    results.write_text('{"key": "0123", "status": "do' + results.read_text())
    return argv


def _grid_with_pose_beside(folder: Path) -> list[str]:
    """A grid file in its own folder names a pose photo beside it, as a manifest would."""
    (folder / "grids").mkdir()
    face_png(folder / "grids" / "pose.png")
    grid = _lines(folder / "grids" / "g.csv", "name,pose", "posed,pose.png")
    return ["bench", "--smoke", "--faces", str(_people(folder)), "--grid", str(grid), "--prompts", "protocol",
            "--out", str(folder / "b")]


CASES = {
    # --- seen failing in the issue -------------------------------------------------------------
    "face is a folder": Case(lambda f: [*QUICK, "--face", str(f), "--out", out(f)], 1,
                             r"face photo: .* is a folder, not a picture"),
    "face is an empty file": Case(lambda f: [*QUICK, "--face", str(_touch(f / "e.jpg")), "--out", out(f)], 1,
                                  r"face photo: .*e\.jpg is empty \(0 bytes\)"),
    "face is a text file named .jpg": Case(lambda f: [*QUICK, "--face", str(text_as_jpg(f / "t.jpg")), "--out", out(f)],
                                           1, r"face photo: .*t\.jpg is not a picture \(36 bytes"),
    "face is a truncated JPEG": Case(lambda f: [*QUICK, "--face", str(truncated_jpeg(f / "cut.jpg")), "--out", out(f)],
                                     1, r"face photo: .*cut\.jpg is damaged or cut off \(image file is truncated"),
    "extra face is not an image": Case(lambda f: [*QUICK, "--face", str(face_png(f / "a.png")), "--extra-face",
                                                  str(text_as_jpg(f / "b.jpg")), "--out", out(f)], 1,
                                       r"extra face photo: .*b\.jpg is not a picture"),
    "steps 0": Case(lambda f: [*QUICK, "--steps", "0", "--out", out(f)], 2,
                    r"steps 0 is out of range: use 1 to 100 \(the official demo goes up to 100"),
    "num-images 0": Case(lambda f: [*QUICK, "--num-images", "0", "--out", out(f)], 2,
                         r"num_images 0 is out of range: use 1 to 8"),
    "negative steps": Case(lambda f: [*QUICK, "--steps", "-5", "--out", out(f)], 2, r"steps -5 is out of range"),
    "NaN guidance": Case(lambda f: [*QUICK, "--guidance-scale", "nan", "--out", out(f)], 2,
                         r"guidance_scale nan is not a number: use 0 to 10"),
    "negative IdentityNet strength": Case(lambda f: [*QUICK, "--identitynet-strength", "-0.5", "--out", out(f)], 2,
                                          r"identitynet_strength -0.5 is out of range: use 0 to 1.5"),
    "adapter strength 50": Case(lambda f: [*QUICK, "--adapter-strength", "50", "--out", out(f)], 2,
                                r"adapter_strength 50.0 is out of range: use 0 to 1.5"),
    "negative noise injection": Case(lambda f: [*QUICK, "--negative-noise", "-1", "--out", out(f)], 2,
                                     r"negative_noise -1.0 is out of range: use 0 to 1"),
    "steps 100000": Case(lambda f: [*QUICK, "--steps", "100000", "--out", out(f)], 2, r"steps 100000 is out of range"),
    "num-images 1000": Case(lambda f: [*QUICK, "--num-images", "1000", "--out", out(f)], 2,
                            r"num_images 1000 is out of range: use 1 to 8"),
    "out in a folder that cannot be created": Case(lambda f: [*QUICK, "--out", str(_touch(f / "file") / "sub" / "x.png")],
                                                   1, r"cannot write into .*file/sub: .*file is a file, not a folder"),
    "existing output is kept": Case(existing_output, 0, r"x\.png already exists: writing .*x_2\.png instead "
                                                        r"\(--overwrite replaces\)", check=kept_and_renamed,
                                    changes_files=True),
    "16-bit PNG of a clear face": Case(lambda f: [*QUICK, "--face", str(face_16bit(f / "g16.png")), "--out", out(f)], 0,
                                       r"saved .*out/x\.png", check=written("out/x.png"), changes_files=True),
    "pose: pickled checkpoint with code": Case(lambda f: ["inspect", str(evil_pickle(f / "ConvNeXtPose_S.tar"))], 1,
                                               r"ConvNeXtPose_S\.tar was refused: besides tensors it holds a Python object \(posix\.system\)"
                                               r".*Download ConvNeXtPose_\{XS,S,M,L\}\.tar again", main=pose_cli.main),
    # --- ours ----------------------------------------------------------------------------------
    "--overwrite replaces": Case(lambda f: [*existing_output(f), "--overwrite"], 0, r"saved .*out/x\.png",
                                 check=overwritten, changes_files=True),
    "out is not a .png": Case(lambda f: [*QUICK, "--out", str(f / "x.jpg")], 1,
                              r"--out .*x\.jpg must end in \.png: the settings, seed and likeness are stored as PNG text"),
    "out is an existing folder": Case(lambda f: [*QUICK, "--out", str(f)], 0, r"saved .*/instantid\.png",
                                      check=written("instantid.png"), changes_files=True),
    "two images get numbered names": Case(lambda f: [*QUICK, "--num-images", "2", "--out", out(f)], 0,
                                          r"saved .*x-1\.png", check=written("out/x-0.png", "out/x-1.png"),
                                          changes_files=True),
    "face does not exist": Case(lambda f: [*QUICK, "--face", str(f / "nope.jpg"), "--out", out(f)], 1,
                                r"face photo: .*nope\.jpg does not exist"),
    "pose image is not an image": Case(lambda f: [*QUICK, "--pose", str(text_as_jpg(f / "p.jpg")), "--out", out(f)], 1,
                                       r"pose image: .*p\.jpg is not a picture"),
    "face photo too small": Case(lambda f: [*QUICK, "--face", str(_tiny(f / "s.png")), "--out", out(f)], 1,
                                 r"face photo: .*s\.png is 32x32; faces need at least 64 px a side"),
    "face photo above Pillow's limit": Case(lambda f: [*QUICK, "--face", str(png_header_only(f / "h.png", 20000, 15000)),
                                                    "--out", out(f)], 1,
                                            r"h\.png is 300 MP, above the 256 MP that Pillow opens safely"),
    "grey photo has no face": Case(lambda f: [*QUICK, "--face", str(_grey(f / "g.png")), "--out", out(f)], 1,
                                   r"No face found \(tried detection sizes 640/480/320/256 and a padded copy\)"),
    "size not a multiple of 64": Case(lambda f: [*QUICK, "--width", "1000", "--height", "1000", "--out", out(f)], 2,
                                      r"size 1000x1000: width and height must be multiples of 64"),
    "width without height": Case(lambda f: [*QUICK, "--width", "512", "--out", out(f)], 2,
                                 r"give both width and height, or neither"),
    "side over 1280": Case(lambda f: [*QUICK, "--width", "2048", "--height", "1024", "--out", out(f)], 2,
                           r"width 2048 is out of range: use 64 to 1280"),
    "negative seed": Case(lambda f: [*QUICK, "--seed", "-1", "--out", out(f)], 2, r"seed -1 is out of range"),
    "seed over 32 bits": Case(lambda f: [*QUICK, "--seed", str(2**40), "--out", out(f)], 2,
                              r"seed 1099511627776 is out of range: use 0 to 4294967295"),
    "unknown style": Case(lambda f: [*QUICK, "--style", "Cubism", "--out", out(f)], 2,
                          r"style 'Cubism' is not one of: No style, Watercolor"),
    "unknown scheduler": Case(lambda f: [*QUICK, "--scheduler", "Fast", "--out", out(f)], 2,
                              r"scheduler 'Fast' is not one of: Euler, Euler a"),
    "unknown combine mode": Case(lambda f: [*QUICK, "--combine", "sum", "--out", out(f)], 2,
                                 r"combine 'sum' is not one of: average, norm_average, concat"),
    "steps not a number": Case(lambda f: [*QUICK, "--steps", "abc", "--out", out(f)], 2,
                               r"argument --steps: invalid int value: 'abc'"),
    "unknown option": Case(lambda f: [*QUICK, "--colour", "red", "--out", out(f)], 2, r"unrecognized arguments: --colour red"),
    "infinite guidance": Case(lambda f: [*QUICK, "--guidance-scale", "inf", "--out", out(f)], 2,
                              r"guidance_scale inf is not a number"),
    "guidance 11": Case(lambda f: [*QUICK, "--guidance-scale", "11", "--out", out(f)], 2,
                        r"guidance_scale 11.0 is out of range: use 0 to 10"),
    "several problems at once": Case(lambda f: [*QUICK, "--steps", "0", "--seed", "-2", "--out", out(f)], 2,
                                     r"these settings are not allowed:\n  - steps 0 is out of range"),
    "no face given outside smoke mode": Case(lambda f: ["generate", "--weights-dir", str(f / "w"), "--out", out(f)], 2,
                                             r"--face is required"),
    "weights missing offline": Case(lambda f: ["generate", "--face", str(face_png(f / "a.png")), "--weights-dir",
                                               str(f / "w"), "--out", out(f)], 1,
                                    r"InstantID weights are missing and offline mode is on\. Download these files",
                                    changes_files=True, env={"HF_HUB_OFFLINE": "1"}),
    "adapter: pickle with code": Case(lambda f: ["inspect", str(evil_pickle(f / "ip-adapter.bin"))], 1,
                                      r"ip-adapter\.bin: refused: besides tensors it holds a Python object \(posix\.system\)"),
    "adapter: random bytes": Case(lambda f: ["inspect", str(_random_bytes(f / "ip-adapter.bin"))], 1,
                                  r"ip-adapter\.bin: cannot be read .* Delete it and download it again"),
    "adapter: missing file": Case(lambda f: ["inspect", str(f / "none.bin")], 1, r"none\.bin: no such file"),
    "pose: folder without a checkpoint": Case(lambda f: ["inspect", str(f)], 1,
                                              r"is a folder but no unzipped checkpoint was found in it",
                                              main=pose_cli.main),
    "pose: missing checkpoint": Case(lambda f: ["inspect", str(f / "L.tar")], 1,
                                     r"Checkpoint not found: .*L\.tar\. Download ConvNeXtPose_", main=pose_cli.main),
    "pose: random bytes": Case(lambda f: ["inspect", str(_random_bytes(f / "M.tar"))], 1,
                               r"Could not read .*M\.tar as a PyTorch checkpoint .* download it again",
                               main=pose_cli.main),
    "pose: unknown variant": Case(lambda f: ["bench", "--smoke", "--variants", "XXL", "--out", str(f / "b")], 1,
                                  r"Unknown ConvNeXtPose variant 'XXL'; choose one of XS, S, M, L", main=pose_cli.main),
    "unknown control kind": Case(lambda f: [*QUICK, "--control", f"hands={face_png(f / 'a.png')}", "--out", out(f)], 2,
                                 r"control 'hands' is not one of: pose, canny, depth"),
    "control photo missing": Case(lambda f: [*QUICK, "--control", f"pose={f / 'nope.jpg'}", "--out", out(f)], 1,
                                  r"pose image: .*nope\.jpg does not exist"),
    "control strength 3": Case(lambda f: [*QUICK, "--control-map", f"canny={face_png(f / 'a.png')}:3", "--out", out(f)], 2,
                               r"canny strength 3.0 is out of range: use 0 to 1.5"),
    "control range backwards": Case(lambda f: [*QUICK, "--control", f"pose={face_png(f / 'a.png')}", "--control-range",
                                               "pose=0.8:0.2", "--out", out(f)], 2,
                                    r"pose range 0.8:0.2: start must be before end"),
    "range for an absent control": Case(lambda f: [*QUICK, "--control-range", "depth=0:0.5", "--out", out(f)], 2,
                                        r"--control-range depth: there is no depth control"),
    "control without image": Case(lambda f: [*QUICK, "--control", "pose", "--out", out(f)], 2,
                                  r"control 'pose' is not KIND=IMAGE\[:STRENGTH\]"),
    "LoRA scale 9": Case(lambda f: [*QUICK, "--lora", "smoke:9", "--out", out(f)], 2,
                         r"LoRA smoke scale 9.0 is out of range: use -2 to 2"),
    "LoRA file missing": Case(lambda f: [*QUICK, "--lora", str(f / "style.safetensors"), "--out", out(f)], 1,
                              r"LoRA .*style\.safetensors: no such file"),
    "LoRA that is not a LoRA": Case(lambda f: [*QUICK, "--lora", str(_random_bytes(f / "x.safetensors")), "--out", out(f)],
                                    1, r"LoRA .*x\.safetensors: cannot be read as an SDXL LoRA"),
    "init strength too small for the steps": Case(lambda f: [*QUICK, "--init-image", str(face_png(f / "a.png")),
                                                             "--out", out(f)], 2,
                                                  r"init_strength 0.8 x steps 1 repaints less than one step"),
    "init strength 0": Case(lambda f: [*QUICK, "--init-image", str(face_png(f / "a.png")), "--init-strength", "0",
                                       "--out", out(f)], 2, r"init_strength 0.0 is out of range: use 0.01 to 1"),
    "init image is not a picture": Case(lambda f: [*QUICK, "--init-image", str(text_as_jpg(f / "s.jpg")),
                                                   "--init-strength", "1", "--out", out(f)],
                                        1, r"start photo: .*s\.jpg is not a picture"),
    "prompt in many scripts": Case(lambda f: [*QUICK, "--prompt", "портрет 肖像 🙂 " * 20, "--out", out(f)], 0,
                                   r"saved .*out/x\.png", check=written("out/x.png"), changes_files=True),
    # --- issue 17: big photos, damaged model files, every option range-checked --------------------------
    "64 MP phone photo of a face": Case(lambda f: [*QUICK, "--face", str(face_jpeg(f / "phone.jpg", 8000)), "--out",
                                                   out(f)], 0, r"saved .*out/x\.png", check=written("out/x.png"),
                                        changes_files=True),
    "face model that is not ONNX": Case(lambda f: [*QUICK, "--out", out(f)], 1,
                                        r"the face models \(antelopev2\): .*/glintr100\.onnx is damaged \(DecodeError.*"
                                        r"python -m instantid_colab download --force .*/glintr100\.onnx",
                                        env={"INSTANTID_WEIGHTS": damaged_smoke_weights(
                                            "faces/models/antelopev2/glintr100.onnx", "not an ONNX model")}),
    "truncated UNet file": Case(lambda f: [*QUICK, "--out", out(f)], 1,
                                r"UNet2DConditionModel: .*unet/diffusion_pytorch_model\.safetensors is damaged "
                                r"\(SafetensorError: .*download --force .*diffusion_pytorch_model\.safetensors",
                                env={"INSTANTID_WEIGHTS": damaged_smoke_weights(
                                    "base/smoke-sdxl/unet/diffusion_pytorch_model.safetensors")}),
    "wrong-size IdentityNet download": Case(lambda f: ["download", "--weights-dir", str(downloaded(f))], 1,
                                            r"diffusion_pytorch_model\.safetensors is \d+ bytes but ControlNetModel/"
                                            r"diffusion_pytorch_model\.safetensors must be 2,502,139,136 bytes \(a "
                                            r"partial or wrong download\)\. Fetch it again: `python -m instantid_colab "
                                            r"download --force .*ControlNetModel/diffusion_pytorch_model\.safetensors`",
                                            changes_files=True, env={"HF_HUB_OFFLINE": "1"}),
    "download --force outside the weights folder": Case(
        lambda f: ["download", "--weights-dir", str(f / "w"), "--force", str(_touch(f / "notes.txt"))], 2,
        r"--force .*notes\.txt: only files under the weights folder .* are deleted and fetched again"),
    "batch on 0 GPUs": Case(lambda f: ["batch", str(f / "m.csv"), "--gpus", "0", "--smoke"], 2,
                            r"gpus 0 is out of range: use 1 to 64"),
    "app on port 70000": Case(lambda f: ["app", "--smoke", "--port", "70000"], 2,
                              r"port 70000 is out of range: use 1 to 65535"),
    "app with a login and without one": Case(lambda f: ["app", "--smoke", "--auth", "a:b", "--no-auth"], 2,
                                             r"argument --no-auth: not allowed with argument --auth"),
    # --- issue 18: several people ------------------------------------------------------------------------
    "one --person": Case(lambda f: [*QUICK, "--person", str(face_png(f / "a.png")), "--out", out(f)], 2,
                         r"--person is given once per person, 2 to 4 times; for one person use --face"),
    "--face and --person": Case(lambda f: [*QUICK, "--face", str(face_png(f / "a.png")), "--person", str(f / "a.png"),
                                           "--person", str(f / "a.png"), "--out", out(f)], 2,
                                r"give --face \(one person, with --extra-face photos\) or --person \(2 to 4 people\)"),
    "five people": Case(lambda f: [*QUICK, *[arg for _ in range(5) for arg in ("--person", str(face_png(f / "a.png")))],
                                   "--out", out(f)], 2, r"people 5 is out of range: use 1 to 4"),
    "--order without people": Case(lambda f: [*QUICK, "--order", "2,1", "--out", out(f)], 2,
                                   r"--person-mask and --order need --person"),
    "person photo missing": Case(lambda f: [*QUICK, "--person", str(face_png(f / "a.png")), "--person",
                                            str(f / "nope.jpg"), "--out", out(f)], 1,
                                 r"photo of person 2: .*nope\.jpg does not exist"),
    "one mask for two people": Case(lambda f: [*QUICK, "--person", str(face_png(f / "a.png")), "--person",
                                               str(f / "a.png"), "--person-mask", str(f / "a.png"), "--out", out(f)], 2,
                                    r"1 masks for 2 people: give one mask per person, or none"),
    "layout photo with one face for two people": Case(
        lambda f: [*QUICK, "--person", str(face_png(f / "a.png")), "--person", str(f / "a.png"), "--pose",
                   str(f / "a.png"), "--out", out(f)], 1,
        r"The layout photo has 1 face but 2 people were given: use a photo with exactly 2 faces, or none"),
    # --- issue 19: refine and swap ----------------------------------------------------------------------
    "refine strength 3": Case(lambda f: [*QUICK, "--refine-face", "3", "--out", out(f)], 2,
                              r"refine_strength 3.0 is out of range: use 0.01 to 1"),
    "swap into a photo without a face": Case(lambda f: ["swap", "--smoke", "--photo", str(_grey(f / "g.png")), "--face",
                                                        str(face_png(f / "a.png")), "--out", out(f)], 1,
                                             r"No face found in the target photo: swap needs a photo with a clearly "
                                             r"visible face"),
    "swap --which 0": Case(lambda f: ["swap", "--smoke", "--photo", str(face_png(f / "a.png")), "--face",
                                      str(f / "a.png"), "--which", "0", "--out", out(f)], 2,
                           r"which 0 is out of range: use 1 to 64"),
    "swap strength 0": Case(lambda f: ["swap", "--smoke", "--photo", str(face_png(f / "a.png")), "--face",
                                       str(f / "a.png"), "--strength", "0", "--out", out(f)], 2,
                            r"strength 0.0 is out of range: use 0.01 to 1"),
    "swap target missing": Case(lambda f: ["swap", "--smoke", "--photo", str(f / "nope.jpg"), "--face",
                                           str(face_png(f / "a.png")), "--out", out(f)], 1,
                                r"target photo: .*nope\.jpg does not exist"),
    "pose bench with batch 0": Case(lambda f: ["bench", "--smoke", "--batch", "0", "--out", str(f / "b")], 2,
                                    r"batch 0 is out of range: use 1 to 4096", main=pose_cli.main),
    # --- issue 25: the last odd inputs, in the form each arrived ---------------------------------------------
    "batch --out naming an existing file": Case(lambda f: ["batch", str(_manifest(f, "a.png")), "--smoke", "--out",
                                                           str(_touch(f / "results.txt"))], 2,
                                                r"--out .*results\.txt is a file; give a folder"),
    "bench --out naming an existing file": Case(lambda f: ["bench", "--smoke", "--out", str(_touch(f / "r.txt"))], 2,
                                                r"--out .*r\.txt is a file; give a folder"),
    "app on a port in use": Case(lambda f: ["app", "--smoke", "--port", str(_taken_port())], 1,
                                 r"port \d+ is in use \(another app, or this one started earlier\): choose another"),
    "--order with superscript digits": Case(lambda f: [*QUICK, "--person", str(face_png(f / "a.png")), "--person",
                                                       str(f / "a.png"), "--pose", str(f / "a.png"), "--order",
                                                       "\u00b2,1", "--out", out(f)], 2,
                                            r"order '\u00b2,1' must list the people 1 to 2 once each, e\.g\. 2,1"),
    "--order without --pose": Case(lambda f: [*QUICK, "--person", str(face_png(f / "a.png")), "--person",
                                              str(f / "a.png"), "--order", "2,1", "--out", out(f)], 2,
                                   r"order places the people on the faces of the pose \(layout\) photo"),
    "guidance interval with a preset of guidance 0": Case(
        lambda f: ["--smoke", "--seed", "3", "--speed", "lightning-4", "--guidance-interval", "0.2,0.8", "--out",
                   out(f)], 0, r"notice: The guidance interval 0\.2,0\.8 was not used: guidance 0\.0 \(lightning-4\) "
                               r"runs no classifier-free guidance to limit\.", check=_interval_not_recorded,
        changes_files=True),
    "an all-black person mask": Case(lambda f: [*QUICK, "--person", str(face_png(f / "a.png")), "--person",
                                                str(f / "a.png"), "--person-mask", str(_filled(f / "w.png", 255)),
                                                "--person-mask", str(_filled(f / "b.png", 0)), "--out", out(f)], 2,
                                     r"the mask of person 2 is all black, which gives them no place in the picture"),
    "a too-small person mask": Case(lambda f: [*QUICK, "--person", str(face_png(f / "a.png")), "--person",
                                               str(f / "a.png"), "--person-mask", str(_tiny(f / "s.png")),
                                               "--person-mask", str(_tiny(f / "s.png")), "--out", out(f)], 1,
                                    r"mask of person 1: .*s\.png is 32x32; it needs at least 64 px a side\. Use a "
                                    r"larger picture"),
    "a person's photo without a face": Case(lambda f: [*QUICK, "--person", str(face_png(f / "a.png")), "--person",
                                                       str(_grey(f / "g.png")), "--out", out(f)], 1,
                                            r"the photo of person 2: No face found"),
    "a batch in which every row failed": Case(lambda f: ["batch", str(_manifest(f, str(_grey(f / "g.png")))),
                                                         "--smoke", "--out", str(f / "runs")], 1,
                                              r"1 of 1 rows failed: each line with \"status\": \"failed\" in .*results"
                                              r"\.jsonl says why", changes_files=True),
    # --- found trying the identity benchmark as a user -----------------------------------------------------
    "bench --faces naming one photo": Case(lambda f: ["bench", "--smoke", "--faces", str(face_png(f / "a.png")),
                                                      "--out", str(f / "b")], 1,
                                           r"--faces .*a\.png: is a file, not a folder; give a folder with one photo"),
    "bench prompts repeating a prompt": Case(lambda f: ["bench", "--smoke", "--prompts",
                                                        str(_lines(f / "p.txt", "a photo", "a painting", "a photo")),
                                                        "--out", str(f / "b")], 1,
                                             r"p\.txt: line 3 repeats line 1; give each prompt once"),
    "a CSV manifest with decimal commas": Case(lambda f: ["batch", str(_lines(f / "m.csv", "face;prompt;steps;"
                                                                              "identitynet_strength",
                                                                              f"{face_png(f / 'a.png')};x;1;0,6")),
                                                          "--smoke", "--out", str(f / "runs")], 1,
                                               r"row 1: identitynet_strength '0,6' is not a number: write the decimal with a "
                                               r"point \(0\.6\)"),
    # --- issue 37: the last odd inputs ------------------------------------------------------------------------
    "bench into a folder used before with other prompts": Case(_second_bench_with_other_prompts, 0, r"1 made here",
                                                               check=_every_picture_is_its_lines, changes_files=True),
    "width and height in a CSV manifest": Case(lambda f: ["batch", str(_lines(f / "m.csv", "face,prompt,steps,width,height",
                                                                          f"{face_png(f / 'a.png')},x,1,64,64")),
                                                          "--smoke", "--out", str(f / "runs")], 0, r"1 made here",
                                               check=_pictures_of_size(64), changes_files=True),
    "a JSON null in a manifest row": Case(lambda f: ["batch", str(_lines(f / "m.jsonl", json.dumps(
        {"face": str(face_png(f / "a.png")), "prompt": "x", "steps": 1, "identity": None, "style": None, "seed": None,
         "pose": None, "combine": None}))), "--smoke", "--out", str(f / "runs")], 0, r"1 made here", changes_files=True),
    "width and height as grid values": Case(lambda f: ["bench", "--smoke", "--faces", str(_people(f)), "--grid",
                                                       "width=64; height=64", "--prompts", "protocol", "--out",
                                                       str(f / "b")], 0, r"setting width=64, height=64",
                                            changes_files=True),
    "a JSON null in a grid file": Case(lambda f: ["bench", "--smoke", "--faces", str(_people(f)), "--grid", str(_lines(
        f / "g.jsonl", json.dumps({"name": "plain", "speed": None}), json.dumps({"name": "softer", "identitynet_strength": 0.6}))),
        "--prompts", "protocol", "--out", str(f / "b")], 0, r"setting softer", changes_files=True),
    "a pickle with code as the FaceID adapter": Case(
        lambda f: [*QUICK, "--identity", "faceid-plusv2", "--out", out(f)], 1,
        r"the FaceID adapter: .*ip-adapter-faceid-plusv2_sdxl\.bin was refused: besides tensors it holds a Python "
        r"object \(posix\.system\).*download --force", changes_files=True,
        env={"INSTANTID_WEIGHTS": hostile_smoke_weights("identity/h94--IP-Adapter-FaceID/ip-adapter-faceid-plusv2_sdxl.bin")}),
    "a pickle with code as PuLID's EVA-CLIP": Case(
        lambda f: [*QUICK, "--identity", "pulid", "--out", out(f)], 1,
        r"PuLID's EVA-CLIP encoder: .*EVA02_CLIP_L_336_psz14_s6B\.pt was refused: besides tensors it holds a Python "
        r"object \(posix\.system\)", changes_files=True,
        env={"INSTANTID_WEIGHTS": hostile_smoke_weights("identity/QuanSun--EVA-CLIP/EVA02_CLIP_L_336_psz14_s6B.pt")}),
    "bench --out under a file": Case(lambda f: ["bench", "--smoke", "--out", str(_touch(f / "r.txt") / "b")], 2,
                                     r"--out .*r\.txt/b: .*r\.txt is a file, not a folder"),
    "batch --out where no folder can be made": Case(lambda f: ["batch", str(_manifest(f, "a.png")), "--smoke", "--out",
                                                               "/proc/instantid-runs"], 2,
                                                    r"--out /proc/instantid-runs: cannot make or write folders in /proc"),
    "a null line in results.jsonl": Case(lambda f: ["batch", str(_manifest(f, "a.png")), "--smoke", "--out",
                                                    str(_results_with(f / "runs", "null"))], 0, r"1 made here",
                                         changes_files=True),
    "a cut-off last line with the next record glued to it": Case(_glued_results, 0, r"0 made here, 1 already done",
                                                                 changes_files=True),
    "two people named without ASCII letters": Case(lambda f: ["bench", "--smoke", "--faces", str(_people(f, "李", "王")),
                                                              "--prompts", "protocol", "--out", str(f / "b")], 0,
                                                   r"person 李: given 李\.png.*person 王: given 王\.png", changes_files=True),
    "a grid file with a setting twice under two names": Case(lambda f: ["bench", "--smoke", "--faces", str(_people(f)),
                                                                        "--grid", str(_lines(f / "g.csv", "name,speed",
                                                                                             "baseline,quality",
                                                                                             "quality,quality")),
                                                                        "--out", str(f / "b")], 2,
                                                             r"grid settings 'baseline' and 'quality' make the same "
                                                             r"pictures \(they set the same values\): keep one"),
    "a grid varying what the method ignores": Case(lambda f: ["bench", "--smoke", "--faces", str(_people(f)), "--grid",
                                                              "identity=pulid; identitynet_strength=0.6,0.8",
                                                              "--prompts", "protocol", "--out", str(f / "b")], 0,
                                                   r"notice: grid settings 'identity=pulid, identitynet_strength=0\.6' "
                                                   r"and 'identity=pulid, identitynet_strength=0\.8' make the same "
                                                   r"pictures \(identitynet_strength: identity pulid does not use it\): "
                                                   r"'identity=pulid, identitynet_strength=0\.8' is left out",
                                                   changes_files=True),
    "a grid file's pose photo beside the file": Case(_grid_with_pose_beside, 0, r"1 made here", changes_files=True),
    "IdentityNet strength with pulid": Case(lambda f: [*QUICK, "--identity", "pulid", "--identitynet-strength", "0.5",
                                                       "--out", out(f)], 0,
                                            r"notice: identitynet_strength 0\.5 was not used: identity pulid does not use it",
                                            changes_files=True),
    "--s-scale with instantid": Case(lambda f: [*QUICK, "--s-scale", "0.5", "--out", out(f)], 0,
                                     r"notice: s_scale 0\.5 was not used: identity instantid does not use it",
                                     changes_files=True),
    "a refine strength that repaints no step": Case(lambda f: ["--smoke", "--seed", "3", "--steps", "2", "--refine-face",
                                                               "0.3", "--out", out(f)], 2,
                                                    r"refine_face 0\.3 x steps 2 repaints less than one step of the "
                                                    r"refine pass: raise the refine strength to at least 0\.50"),
}


def _lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _tiny(path: Path) -> Path:
    Image.new("RGB", (32, 32)).save(path)
    return path


def _grey(path: Path) -> Path:
    Image.new("RGB", (256, 256), (128, 128, 128)).save(path)
    return path


def _random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    return path


@pytest.mark.parametrize("name", CASES)
def test_odd_input(name, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    folder = tmp_path / "work"
    folder.mkdir()
    for key, value in case.env.items():
        monkeypatch.setenv(key, value(folder) if callable(value) else value)
    argv = case.argv(folder)
    if case.main is cli.main and argv[0] == "--smoke":
        argv = ["generate", *argv]
    before = snapshot(folder)
    try:
        code = case.main(argv)
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    printed = capsys.readouterr()
    stream = printed.out if case.code == 0 else printed.err
    assert code == case.code, printed.err[-2000:]
    assert re.search(case.message, stream, re.S), stream[-2000:]
    if case.code != 0:
        assert "Traceback" not in printed.err
    if not case.changes_files:
        assert snapshot(folder) == before
    if case.check is not None:
        case.check(folder)


def test_corpus_size():
    assert len(CASES) >= 101  # the first issue's 17 + 30 of our own, issue 17's 10 + 5 before it, 7 people, 5 swap,
    # issue 25's 10, 3 found trying the identity benchmark, issue 37's 19


def test_ctrl_c_during_generation_exits_130_and_saves_nothing(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "generate", interrupted)
    assert cli.main(["generate", *QUICK, "--out", str(tmp_path / "x.png")]) == 130
    assert "stopped (Ctrl-C): nothing was saved" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_our_bugs_say_so_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(pipeline, "load_pipeline", broken)
    argv = ["generate", *QUICK, "--out", str(tmp_path / "x.png")]
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError: division by zero" in err and "--debug" in err
    assert "Traceback" not in err
    assert cli.main([*argv, "--debug"]) == 3
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_evil_pickle_never_ran(tmp_path, capfd):
    """The refused pickles above would print 'owned' had they been unpickled."""
    pose_cli.main(["inspect", str(evil_pickle(tmp_path / "x.tar"))])
    cli.main(["inspect", str(evil_pickle(tmp_path / "y.bin"))])
    assert "owned" not in capfd.readouterr().out
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "x.tar", weights_only=True)


# --- the public Python API: the same LIMITS, the same SettingsError --------------------------------------------
def _faces_with_det_size(size):
    from instantid_colab import faces

    return faces.FaceAnalyzer(Path(smoke.build_smoke_weights().face_root), det_size=size)


def _open_with_max_side(side):
    from instantid_colab import images

    return images.open_image(smoke.sample_face_image(), "face photo", max_side=side)


API_CASES = {
    "choose_plan at 0x0": (lambda: memory.choose_plan(11.0, 14.7, 0, 0), r"width 0 is out of range: use 64 to 1280"),
    "choose_plan with batch -1": (lambda: memory.choose_plan(11.0, 14.7, batch=-1),
                                  r"batch -1 is out of range: use 1 to 8"),
    "choose_plan with negative RAM": (lambda: memory.choose_plan(-3, 14.7), r"ram_available_gib -3.0 is out of range"),
    "choose_plan with NaN VRAM": (lambda: memory.choose_plan(11.0, float("nan")), r"vram_free_gib nan is not a number"),
    "step_down at 1000x1000": (lambda: memory.step_down(memory.choose_plan(11.0, 14.7), ram_available_gib=11.0,
                                                        width=1000, height=1000),
                               r"size 1000x1000: width and height must be multiples of 64"),
    "plan_controls with batch 0": (lambda: memory.plan_controls(memory.choose_plan(11.0, None), {}, None, 8.0, batch=0),
                                   r"batch 0 is out of range"),
    "open_image with max_side 0": (lambda: _open_with_max_side(0), r"max_side 0 is out of range: use 64 to 65535"),
    "FaceAnalyzer with det_size 10": (lambda: _faces_with_det_size(10), r"det_size 10 is out of range: use 160 to 1280"),
}


@pytest.mark.parametrize("name", API_CASES)
def test_public_functions_check_their_arguments_like_the_cli(name):
    call, message = API_CASES[name]
    with pytest.raises(SettingsError, match=message):
        call()
