"""The five Colab notebooks: hygiene (what review asks of every cell) and a smoke run of each.

The smoke run is the CI version of the user's "Run all": each notebook is executed top to bottom in
a fresh `python3` kernel with the papermill-style smoke parameters injected after its `parameters`
cell (tiny random weights, synthetic pose data, no GPU, no network), and its outputs are checked.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager
from PIL import Image

from instantid_colab import notebook as helpers

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NAMES = ["01_install", "02_load_models", "03_generate", "04_convnextpose_benchmark", "05_identity_benchmark"]
BADGE_URL = "https://colab.research.google.com/github/instantid-colab/instantid-colab/blob/main/notebooks/{}.ipynb"
REPO_URL = "https://github.com/instantid-colab/instantid-colab"
MAX_CODE_LINES = 6
SMOKE_PARAMETERS = 'SMOKE = True\nPIP_COMMAND = "echo pip step skipped: smoke mode imports the package from the checkout"'
NOTEBOOK_TIMEOUT_S = 900  # the whole notebook, however its cells share it (a loaded 2-core machine: ~4x a quiet one)
SMOKE_LABEL = "smoke: random weights"
# Statements that are logic or definitions: they belong in instantid_colab/notebook.py, not in a cell.
FORBIDDEN_NODES = (
    ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.If, ast.IfExp, ast.For,
    ast.AsyncFor, ast.While, ast.Try, ast.With, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
)


def load(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def counted_lines(source: str) -> list[str]:
    """Lines a reader has to read as code: not blank, not comments, not Colab form fields."""
    return [
        line for line in source.splitlines()
        if line.strip() and not line.lstrip().startswith("#") and "#@param" not in line
    ]


def parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    tagged = [cell for cell in nb.cells if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def test_the_five_notebooks_and_nothing_else() -> None:
    assert sorted(path.stem for path in NOTEBOOK_DIR.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name: str) -> None:
    for cell in code_cells(load(name)):
        assert cell.outputs == [] and cell.execution_count is None, cell.source


@pytest.mark.parametrize("name", NAMES)
def test_title_badge_and_explanations(name: str) -> None:
    nb = load(name)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert f"({BADGE_URL.format(name)})" in first.source
    assert "colab-badge.svg" in first.source
    for previous, cell in zip(nb.cells, nb.cells[1:]):
        if cell.cell_type == "code":
            assert previous.cell_type == "markdown", f"code cell without an explanation above it:\n{cell.source}"


def cell_problems(source: str) -> list[str]:
    """What review would refuse in a notebook cell: too long, definitions, or logic (loops, ifs, ...)."""
    problems = []
    lines = counted_lines(source)
    if len(lines) > MAX_CODE_LINES:
        problems.append(f"{len(lines)} lines (at most {MAX_CODE_LINES})")
    if re.search(r"\bdef |\bclass |\blambda\b", source):
        problems.append("a definition")
    tree = ast.parse(TransformerManager().transform_cell(source))  # `!cmd` and `%magic` become calls
    problems += sorted({type(node).__name__ for node in ast.walk(tree) if isinstance(node, FORBIDDEN_NODES)})
    return problems


def test_cell_checker_refuses_logic_definitions_and_long_cells() -> None:
    assert cell_problems("!{PIP_COMMAND}\nx = 1  #@param {type:'integer'}\n# note\nprint(x)") == []
    assert cell_problems("for i in range(3):\n    print(i if i else -1)") == ["For", "IfExp"]
    assert cell_problems("f = lambda: [i for i in range(2)]") == ["a definition", "Lambda", "ListComp"]
    assert cell_problems("\n".join(f"x{i} = {i}" for i in range(MAX_CODE_LINES + 1))) == ["7 lines (at most 6)"]


@pytest.mark.parametrize("name", NAMES)
def test_cells_are_short_calls_without_definitions_or_logic(name: str) -> None:
    for cell in code_cells(load(name)):
        assert cell_problems(cell.source) == [], f"move this into instantid_colab/notebook.py:\n{cell.source}"


@pytest.mark.parametrize("name", NAMES)
def test_parameters_cell_defaults_to_colab_and_holds_the_only_repo_url(name: str) -> None:
    nb = load(name)
    parameters = parameters_cell(nb)
    values = {}
    exec(parameters.source, {}, values)  # the cell is plain assignments; its values are what Colab runs with
    assert values["SMOKE"] is False
    assert values["REPO_URL"] == REPO_URL
    # --no-deps: the dependencies go through installer.install, which changes nothing installed
    assert values["PIP_COMMAND"] == f"pip install -q --no-deps git+{REPO_URL}"
    with_url = [cell.source for cell in code_cells(nb) if "github.com/" in cell.source]
    assert with_url == [parameters.source]
    sources = [cell.source for cell in nb.cells]
    first_import = next(i for i, source in enumerate(sources) if "instantid_colab" in source and "import" in source)
    assert sources.index(parameters.source) < sources.index("!{PIP_COMMAND}") < first_import


def test_style_dropdown_lists_exactly_the_package_styles() -> None:
    from instantid_colab.styles import STYLES

    form = next(cell.source for cell in code_cells(load("03_generate")) if cell.source.lstrip().startswith("#@title Settings"))
    line = next(line for line in form.splitlines() if line.startswith("STYLE ="))
    choices = ast.literal_eval(line.split("#@param", 1)[1].strip())
    assert choices == list(STYLES)
    assert ast.literal_eval(line.split("=", 1)[1].split("#", 1)[0].strip()) in STYLES


def test_speed_dropdown_lists_exactly_the_speed_presets() -> None:
    from instantid_colab.speed import SPEEDS

    form = next(cell.source for cell in code_cells(load("03_generate")) if cell.source.lstrip().startswith("#@title Settings"))
    line = next(line for line in form.splitlines() if line.startswith("SPEED ="))
    assert ast.literal_eval(line.split("#@param", 1)[1].strip()) == list(SPEEDS)


def test_size_dropdown_offers_the_pipeline_presets() -> None:
    from instantid_colab.settings import SIZE_PRESETS
    from instantid_colab.smoke import SMOKE_SIZE

    form = next(cell.source for cell in code_cells(load("03_generate")) if cell.source.lstrip().startswith("#@title Settings"))
    line = next(line for line in form.splitlines() if line.startswith("SIZE ="))
    choices = ast.literal_eval(line.split("#@param", 1)[1].strip())
    assert choices == ["Auto", *SIZE_PRESETS]
    assert [helpers.output_size(choice) for choice in choices] == [(None, None), *SIZE_PRESETS.values()]
    assert helpers.output_size(choices[1], smoke=True) == (SMOKE_SIZE, SMOKE_SIZE)


def test_check_gpu_without_cuda_says_how_to_switch(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(helpers.NoGPUError, match=r"Runtime > Change runtime type > .*T4 GPU"):
        helpers.check_gpu(smoke=False)
    helpers.check_gpu(smoke=True)
    assert capsys.readouterr().out == "GPU: none (smoke: random weights run on the CPU, no GPU needed)\n"


def test_mount_drive_off_or_outside_colab_keeps_local_disk() -> None:
    assert helpers.mount_drive(False) is None
    assert not helpers.in_colab()
    assert helpers.mount_drive(True) is None


def test_face_image_reads_a_given_path_as_rgb(tmp_path: Path) -> None:
    Image.new("L", (80, 70), 200).save(tmp_path / "face.png")
    image = helpers.face_image(str(tmp_path / "face.png"))
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (80, 70), (200, 200, 200))
    Image.new("L", (40, 30), 200).save(tmp_path / "tiny.png")
    with pytest.raises(ValueError, match=r"face photo: .*tiny.png is 40x30; faces need at least 64 px a side"):
        helpers.face_image(str(tmp_path / "tiny.png"))


def test_face_image_outside_colab_without_path_says_what_to_do() -> None:
    with pytest.raises(FileNotFoundError, match="set FACE_IMAGE"):
        helpers.face_image("", smoke=False)


class FakeColabOutput:
    """`google.colab.output` as the notebook helpers call it; records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, dict]] = []

    def serve_kernel_port_as_iframe(self, port: int, **options) -> None:
        self.calls.append(("iframe", port, options))

    def serve_kernel_port_as_window(self, port: int, **options) -> None:
        self.calls.append(("window", port, options))


@pytest.fixture
def fake_colab(monkeypatch: pytest.MonkeyPatch) -> FakeColabOutput:
    import types

    output = FakeColabOutput()
    colab = types.ModuleType("google.colab")
    colab.output = output
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.output", output)
    return output


def test_in_notebook_display_in_colab_goes_through_colabs_port_proxy(fake_colab, smoke_session, capsys) -> None:
    from urllib.parse import urlsplit

    url = helpers.launch_app(smoke_session, smoke=True, auth="me:secret", display="in this notebook")
    port = urlsplit(url).port
    assert urlsplit(url).hostname in ("127.0.0.1", "localhost", "0.0.0.0")  # local: no public tunnel
    assert fake_colab.calls == [("window", port, {"anchor_text": "Open the app in a new browser tab"}),
                                ("iframe", port, {"height": helpers.APP_HEIGHT})]
    out = capsys.readouterr().out
    assert "APP_LOGIN is for the share link; the in-notebook view is reachable only from this notebook." in out
    assert f"App answered HTTP 200 at {url} (smoke: random weights; now closed)" in out


def test_share_link_display_opens_a_public_link_behind_the_login(fake_colab, monkeypatch, capsys) -> None:
    from instantid_colab import app

    launched = []

    def fake_launch(session, **options):
        launched.append(options)
        return app.Launched(None, "http://127.0.0.1:7860/", "https://0123abcd.gradio.live")

    monkeypatch.setattr(app, "launch", fake_launch)
    assert helpers.launch_app("session", auth="me:secret", display="share link") == "https://0123abcd.gradio.live"
    assert launched == [{"share": True, "auth": "me:secret", "block": False, "inline": False}]
    assert fake_colab.calls == []  # nothing shown through the port proxy
    assert capsys.readouterr().out == f"Open the app: https://0123abcd.gradio.live\nNote: {helpers.FREE_TIER_NOTE}\n"


def test_share_link_in_smoke_mode_serves_locally_and_unknown_displays_are_refused(smoke_session, capsys) -> None:
    url = helpers.launch_app(smoke_session, smoke=True, display="share link")
    out = capsys.readouterr().out
    assert out.startswith("Share link skipped (smoke: offline); serving the app locally instead.\n")
    assert f"App answered HTTP 200 at {url}" in out and "gradio.live" not in url
    with pytest.raises(ValueError, match="DISPLAY 'public' is not one of: in this notebook, share link"):
        helpers.launch_app(smoke_session, display="public")


def test_extras_turn_the_form_fields_into_generate_keywords(tmp_path: Path, capsys) -> None:
    from instantid_colab.controls import Control
    from instantid_colab.loras import Lora

    Image.new("RGB", (96, 80), (10, 20, 30)).save(tmp_path / "start.png")
    chosen = helpers.extras(pose="", canny="edges.jpg", depth="room.jpg", control_strength=0.5,
                            lora="owner/style-lora", lora_scale=0.7, start_photo=str(tmp_path / "start.png"),
                            start_strength=0.6)
    assert chosen["controls"] == [Control("canny", "edges.jpg", 0.5), Control("depth", "room.jpg", 0.5)]
    assert chosen["loras"] == [Lora("owner/style-lora", 0.7)]
    assert (chosen["init_image"].size, chosen["init_image"].getpixel((0, 0)), chosen["init_strength"]) == (
        (96, 80), (10, 20, 30), 0.6)
    assert capsys.readouterr().out == "Extras: canny, depth, LoRA owner/style-lora, start photo\n"
    assert helpers.extras() == {"controls": [], "loras": [], "init_image": None, "init_strength": 0.8}
    assert capsys.readouterr().out == "Extras: none\n"


def test_the_people_field_replaces_the_face_photo(tmp_path: Path, capsys) -> None:
    from instantid_colab import smoke

    for name, colour in (("anna.png", (235, 200, 175)), ("ben.png", (170, 200, 240)), ("ben2.png", (170, 200, 240))):
        smoke.sample_face_image(face_color=colour).save(tmp_path / name)
    chosen = helpers.extras(people=f"{tmp_path / 'anna.png'}; {tmp_path / 'ben.png'}+{tmp_path / 'ben2.png'}",
                            people_order="")
    assert [len(person.photos) for person in chosen["people"]] == [1, 2] and chosen["order"] is None
    assert chosen["pose_image"] is None and capsys.readouterr().out == "Extras: 2 people\n"
    assert helpers.face_image("unused.jpg", extras=chosen) is None
    assert capsys.readouterr().out == "People: 2 persons; FACE_IMAGE is not used\n"


def test_batch_without_a_manifest_says_what_to_give(smoke_session, tmp_path: Path, capsys) -> None:
    assert helpers.batch(smoke_session, "", tmp_path / "out") is None
    out = capsys.readouterr().out
    assert out.startswith("No MANIFEST: give a CSV or JSONL file, one image per row (columns: face, prompt,")
    assert not (tmp_path / "out").exists()


# --- smoke execution ---------------------------------------------------------------------------


def execute(name: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    """Run the notebook as CI's "Run all": smoke parameters injected, fresh kernel, cwd = workdir."""
    from nbclient import NotebookClient

    nb = load(name)
    position = nb.cells.index(parameters_cell(nb)) + 1
    injected = nbformat.v4.new_code_cell(SMOKE_PARAMETERS, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(position, injected)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT_S
    client = NotebookClient(  # each cell gets what is left of the notebook's time
        nb, kernel_name="python3", timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    return nb


def texts(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in code_cells(nb):
        for output in cell.outputs:
            parts.append(output.get("text", ""))
            parts.extend(output.get("data", {}).get(kind, "") for kind in ("text/plain", "text/markdown"))
    return "\n".join(parts)


def images(nb: nbformat.NotebookNode) -> list[Image.Image]:
    found = []
    for cell in code_cells(nb):
        for output in cell.outputs:
            data = output.get("data", {}).get("image/png")
            if data:
                found.append(Image.open(io.BytesIO(base64.b64decode(data))))
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One working folder for the four runs, as one Colab machine would be (02 and 03 share smoke weights)."""
    return tmp_path_factory.mktemp("notebooks")


def test_01_install_runs_in_smoke_mode(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = texts(execute("01_install", workdir, monkeypatch))
    assert "pip step skipped" in output
    assert "GPU: none (smoke: random weights run on the CPU, no GPU needed)" in output
    assert "smoke: dry run, nothing installed" in output
    assert re.search(r"torch 2\.\d+", output) and "Python 3." in output  # the doctor table


def test_02_load_models_runs_in_smoke_mode(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = texts(execute("02_load_models", workdir, monkeypatch))
    assert f"Weights: {SMOKE_LABEL}" in output
    assert (workdir / "outputs" / "smoke-weights" / "InstantID" / "ip-adapter.bin").is_file()
    table = output[output.index(f"{SMOKE_LABEL}\nstage "):]
    stages = [line.split("  ")[0] for line in table.splitlines()[1:] if line.startswith("load ")]
    assert {"load unet", "load identitynet", "load adapter", "load face analysis"} <= set(stages)
    assert len(stages) == len(set(stages))  # loaded once, one row per stage


def test_03_generate_runs_in_smoke_mode(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = execute("03_generate", workdir, monkeypatch)
    output = texts(nb)
    generated, keypoints, swapped, sheet = images(nb)
    assert generated.size == keypoints.size == (128, 128)
    assert swapped.size == (640, 640)  # the face swap cell: the smoke photo keeps its size
    assert re.search(r"face at \[\d+, \d+, \d+, \d+\], strength 0.7: likeness .*; saved outputs/swap.png", output)
    assert keypoints.getextrema() != ((0, 0), (0, 0), (0, 0))  # the five keypoints are drawn
    assert output.count(SMOKE_LABEL) >= 2  # the weights line and the images' caption
    assert "seed 42" in output
    answered = re.search(r"App answered HTTP 200 at (http://[\w.]+:\d+/?) \(smoke: random weights; now closed\)", output)
    assert answered
    frames = [o.data["text/html"] for c in code_cells(nb) for o in c.outputs if "text/html" in o.get("data", {})]
    assert any(f'src="{answered.group(1)}"' in frame for frame in frames)  # DISPLAY "in this notebook", outside Colab
    assert "Extras: pose, LoRA smoke (smoke: sample pose photo, tiny LoRA)" in output
    assert f"[{SMOKE_LABEL}] 2 rows: 2 made here, 0 already done, 0 failed" in output
    assert sheet.size == (4 * 256, 24 + 256 + 36)  # the batch's contact sheet: label strip, one row of tiles, captions
    lines = (workdir / "outputs" / "batch" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["seed"] for line in lines] == [1, 2]


def test_04_convnextpose_benchmark_runs_in_smoke_mode(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = execute("04_convnextpose_benchmark", workdir, monkeypatch)
    output = texts(nb)
    rows = [line for line in output.splitlines() if line.startswith("| ") and SMOKE_LABEL in line]
    assert [row.split("|")[1].strip() for row in rows] == ["XS", "S", "M", "L"]
    assert all("P2 MPJPE" in row for row in rows)
    out = workdir / "outputs" / "convnextpose"
    assert sorted(path.name for path in out.glob("variant_*.json")) == [f"variant_{v}.json" for v in ("L", "M", "S", "XS")]
    (shown,) = images(nb)
    with Image.open(out / "accuracy_vs_speed.png") as written:
        assert shown.size == written.size and shown.tobytes() == written.convert(shown.mode).tobytes()


def test_05_identity_benchmark_runs_in_smoke_mode(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = execute("05_identity_benchmark", workdir, monkeypatch)
    output = texts(nb)
    assert "56 images: 2 people x 1 prompts x 7 settings x 4 seeds" in output
    assert "person bob: given bob-1.png; held out: bob-2.png" in output
    rows = [line for line in output.splitlines() if line.startswith("| speed=")]
    assert [row.split("|")[1].strip() for row in rows[:7]] == [f"speed={name}" for name in
                                                             ("quality", "lcm", "lightning-4", "lightning-8", "hyper-8",
                                                              "dmd2-4", "tcd")]
    assert f"**{SMOKE_LABEL}**" in output
    out = workdir / "outputs" / "identity_bench"
    plot, sheet = images(nb)
    with Image.open(out / "likeness_vs_prompt.png") as written:
        assert plot.size == written.size
    assert sheet.size[0] == 7 * 256


def test_notebook_03s_identity_choices_are_the_registrys():
    import re

    from instantid_colab import engines

    source = "".join(cell["source"] for cell in nbformat.read(NOTEBOOK_DIR / "03_generate.ipynb", as_version=4).cells)
    (choices,) = re.findall(r'IDENTITY = "\w+"  #@param (\[.*\])', source)
    assert json.loads(choices) == list(engines.METHODS)
