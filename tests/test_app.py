"""The app's small pieces without a browser: input parsing, validation, rendering, wiring to the core."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import numpy as np
from PIL import Image

from instantid_colab import app, cli, memory, pipeline, schedulers, settings, settings_files, smoke, speed, styles
from instantid_colab.smoke import SMOKE_LABEL
from tests.pictures import png_header_only


def _session(smoke: bool = True):
    """What build_app reads from a session: the smoke flag, the memory plan and what each identity method loaded."""
    return SimpleNamespace(smoke=smoke, plan=None, identity_methods=lambda: [])


def _components(blocks: gr.Blocks, kind: type) -> list:
    return [block for block in blocks.blocks.values() if isinstance(block, kind)]


def _choices(dropdown: gr.Dropdown) -> list[str]:
    return [value for _, value in dropdown.choices]


@pytest.mark.parametrize(
    ("text", "size"),
    [(app.AUTO_SIZE, None), ("", None), ("896x1152", (896, 1152)), (" 1216 × 832 ", (1216, 832))],
)
def test_parse_size_reads_auto_and_typed_sizes(text, size):
    assert app.parse_size(text) == size


def test_parse_size_reads_every_core_preset_by_its_name():
    for name, size in settings.SIZE_PRESETS.items():
        assert app.parse_size(name) == size
    assert app.SIZE_CHOICES == (app.AUTO_SIZE, *settings.SIZE_PRESETS)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1000x1000", "multiples of 64"),
        ("1024x1408", "height 1408 is out of range: use 64 to 1280"),
        ("big", "not WIDTHxHEIGHT"),
        ("1024x", "not WIDTHxHEIGHT"),
    ],
)
def test_parse_size_refuses_sizes_the_core_cannot_make(text, message):
    with pytest.raises(app.InputError, match=message):
        app.parse_size(text)


@pytest.mark.parametrize(
    ("text", "credentials"),
    [("alice:s3cret", ("alice", "s3cret")), ("alice:a:b", ("alice", "a:b")), (None, None), ("", None)],
)
def test_parse_auth_splits_at_the_first_colon(text, credentials):
    assert app.parse_auth(text) == credentials


@pytest.mark.parametrize(
    ("text", "message"), [("alice", "no ':' was given"), (":pw", "non-empty"), ("bob:", "non-empty")]
)
def test_parse_auth_refuses_incomplete_logins(text, message):
    with pytest.raises(ValueError, match=message):
        app.parse_auth(text)


def test_check_image_file_accepts_a_photo_and_refuses_what_no_detector_can_use(tmp_path):
    photo, note, tiny, huge = (tmp_path / name for name in ("photo.png", "note.png", "tiny.png", "huge.png"))
    Image.new("RGB", (640, 480), (10, 20, 30)).save(photo)
    note.write_text("not an image")
    Image.new("RGB", (32, 48)).save(tiny)
    png_header_only(huge, 20000, 15000)

    opened = app.check_image_file(photo, "face photo")
    assert opened.size == (640, 480) and opened.getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(app.InputError, match="^face photo: note.png is not a picture \\(12 bytes that no image reader"):
        app.check_image_file(note, "face photo")
    with pytest.raises(app.InputError, match="^face photo: tiny.png is 32x48; faces need at least 64 px"):
        app.check_image_file(tiny, "face photo")
    with pytest.raises(app.InputError, match="^pose image: huge.png is 300 MP, above the 256 MP that Pillow opens safely"):
        app.check_image_file(huge, "pose image")


def test_render_settings_puts_label_and_seed_first_and_escapes_table_cells():
    text = app.render_settings(1234, {"prompt": "a | b\nc", "steps": 30}, 2.345, SMOKE_LABEL)
    lines = text.splitlines()
    assert lines[0] == f"**{SMOKE_LABEL}**"
    assert "**seed 1234** · 2.3 s" in lines
    assert "| prompt | a \\| b c |" in lines
    assert "| steps | 30 |" in lines


def test_memory_panel_shows_ram_now_and_the_plan_with_its_why():
    plan = memory.choose_plan(ram_available_gib=12.0, vram_free_gib=14.6)
    text = app.render_memory(plan)
    assert text.startswith("**Memory now**\n- RAM: ")
    assert f"- why: {plan.why}" in text.splitlines()
    assert f"placement {plan.placement}" in text
    assert "**Memory plan**" not in app.render_memory(None)
    assert app.SMOKE_PLAN_NOTE not in text and app.SMOKE_PLAN_NOTE in app.render_memory(plan, smoke=True)


def _handler_args(**changes):
    args = dict(
        face_path=None, extra_face_files=None, combine="average", pose_path=None, prompt="", negative_prompt="",
        style=styles.DEFAULT_STYLE, identitynet_strength=0.8, adapter_strength=0.8, steps=30, guidance_scale=5.0,
        scheduler=app.SPEED_SCHEDULER, seed=42, randomize_seed=False, enhance_non_face=True, negative_noise=0.0,
        speed_mode="quality",
        size=app.AUTO_SIZE, num_images=1,
    )  # fmt: skip
    args.update(changes)
    return args


def run(handler, **changes) -> tuple:
    """The page's outputs once the handler (a generator: previews, then the results) is done, less the preview."""
    *_, last = handler(**_handler_args(**changes))
    return last[:6]


def test_generate_handler_turns_bad_inputs_into_page_errors_before_the_core_runs(tmp_path):
    handler = app._generate_handler(session=None)  # never reached: validation fails first
    note = tmp_path / "face.jpg"
    note.write_text("a text file renamed to .jpg")
    with pytest.raises(gr.Error, match="upload a face photo first"):
        run(handler)
    with pytest.raises(gr.Error, match="face photo: face.jpg is not a picture"):
        run(handler, face_path=str(note))


def test_page_lists_styles_and_schedulers_from_the_core_and_sizes_from_the_presets():
    blocks = app.build_app(_session())
    dropdowns = {dropdown.label: dropdown for dropdown in _components(blocks, gr.Dropdown)}
    assert _choices(dropdowns["Style"]) == list(styles.STYLES)
    assert len(styles.STYLES) == 9
    assert _choices(dropdowns["Scheduler"]) == [app.SPEED_SCHEDULER, *(
        name for name in schedulers.SCHEDULERS if name not in ("LCM", "TCD"))]
    assert "DPM++ 2M Karras" in _choices(dropdowns["Scheduler"])
    assert dropdowns["Scheduler"].value == app.SPEED_SCHEDULER
    assert _choices(dropdowns["Speed"]) == list(speed.SPEEDS) and dropdowns["Speed"].value == "quality"
    assert _choices(dropdowns["Combine several faces"]) == list(settings.COMBINE_MODES)
    assert _choices(dropdowns["Output size"]) == list(app.SIZE_CHOICES)
    assert [timer.value for timer in _components(blocks, gr.Timer)] == [app.MEMORY_REFRESH_S]
    sliders = {slider.label: slider for slider in _components(blocks, gr.Slider)}
    strength = sliders["IdentityNet strength (for fidelity)"]
    assert (strength.minimum, strength.maximum, strength.step, strength.value) == (0, 1.5, 0.05, 0.8)
    assert (sliders["Steps"].value, sliders["Guidance"].value) == (30, 5.0)


def test_smoke_banner_shows_only_for_smoke_weights():
    def banners(blocks):
        return [html.value for html in _components(blocks, gr.HTML) if SMOKE_LABEL in (html.value or "")]

    assert len(banners(app.build_app(_session(smoke=True)))) == 1
    assert banners(app.build_app(_session(smoke=False))) == []


def test_the_page_says_how_to_read_a_likeness_difference():
    blocks = app.build_app(_session())
    (help_section,) = [accordion for accordion in _components(blocks, gr.Accordion)
                       if accordion.elem_id == "likeness-help"]
    texts = [markdown.value for markdown in _components(blocks, gr.Markdown)]
    assert app.LIKENESS_HELP in texts and help_section.label == "How to read the likeness"
    assert "two pictures 0.02 apart are a draw" in app.LIKENESS_HELP and "instantid_colab bench" in app.LIKENESS_HELP


def test_a_speed_mode_moves_steps_and_guidance_to_its_card_values():
    steps, guidance = app._speed_switch("lcm")
    assert (steps["value"], guidance["value"]) == (5, 1.5)
    steps, guidance = app._speed_switch("lightning-4")
    assert (steps["value"], guidance["value"]) == (4, 0.0)
    steps, guidance = app._speed_switch("quality")
    assert (steps["value"], guidance["value"]) == (30, 5.0)


def test_choosing_a_method_greys_out_what_its_registry_line_does_not_read():
    assert app.METHOD_CONTROLS == ("identitynet_strength", "enhance_non_face", "s_scale", "combine")
    assert [u["interactive"] for u in app._identity_switch("faceid-plusv2")] == [False, False, True, True]
    assert [u["interactive"] for u in app._identity_switch("instantid")] == [True, True, False, True]
    assert [u["interactive"] for u in app._identity_switch("pulid")] == [False, False, False, False]


def test_live_previews_reach_the_page_while_the_image_forms(smoke_session, face_file):
    outputs = list(app._generate_handler(smoke_session)(**_handler_args(face_path=face_file, steps=10, size="64x64",
                                                                         live_preview=True)))
    previews = [output[6] for output in outputs[:-1] if isinstance(output[6], Image.Image)]  # beside heartbeats
    assert [image.size for image in previews] == [(64, 64)] * (10 // speed.PREVIEW_EVERY)  # after steps 5 and 10
    assert len(outputs[-1][0]) == 1 and len(outputs[-1]) == 7  # then the image


def test_gallery_download_keeps_the_png_text_the_core_writes(tmp_path):
    gallery = _components(app.build_app(_session()), gr.Gallery)[0]
    image = Image.new("RGB", (64, 64))
    image.info["instantid"] = '{"seed": 1234}'  # where pipeline.generate puts the settings
    payload = gallery.postprocess([(image, "caption")])
    saved = Image.open(payload.root[0].image.path)
    assert saved.format == "PNG"
    assert saved.info["instantid"] == '{"seed": 1234}'


def test_launch_refuses_a_bad_login_before_serving():
    with pytest.raises(ValueError, match="USER:PASSWORD"):
        app.launch(_session(), auth="alice", share=False, block=False)


class FakeLaunch:
    """gr.Blocks.launch as `app.launch` calls it: records the options, returns a share link when asked."""

    def __init__(self) -> None:
        self.options: list[dict] = []

    def __call__(self, **options):
        self.options.append(options)
        return None, "http://127.0.0.1:7860/", "https://0123abcd.gradio.live" if options["share"] else None


@pytest.fixture
def fake_launch(monkeypatch) -> FakeLaunch:
    fake = FakeLaunch()
    monkeypatch.setattr(gr.Blocks, "launch", lambda blocks, **options: fake(**options))
    return fake


def test_a_share_link_without_a_login_gets_a_random_one_printed_beside_it(fake_launch, capsys):
    first = app.launch(_session(), share=True, block=False)
    second = app.launch(_session(), share=True, block=False)
    user, password = first.login
    assert fake_launch.options[0]["auth"] == (user, password) and fake_launch.options[0]["share"] is True
    assert re.fullmatch(r"user-[0-9a-f]{6}", user) and len(password) >= 16
    assert second.login != first.login  # made anew for each run
    printed = capsys.readouterr().out.splitlines()[0]
    assert printed.startswith(f"Share link https://0123abcd.gradio.live: log in as user {user}, password {password}")


def test_a_given_login_is_used_and_no_auth_serves_the_link_open_on_purpose(fake_launch, capsys):
    assert app.launch(_session(), share=True, auth="me:secret", block=False).login == ("me", "secret")
    assert fake_launch.options[-1]["auth"] == ("me", "secret")
    assert capsys.readouterr().out == ""  # the user knows their own login
    assert app.launch(_session(), share=True, open_access=True, block=False).login is None
    assert fake_launch.options[-1]["auth"] is None
    assert "has no login (--no-auth): anyone who sees it can use the app" in capsys.readouterr().out


def test_a_local_address_needs_no_login_and_share_follows_colab(fake_launch, monkeypatch, capsys):
    from instantid_colab import environment

    assert app.launch(_session(), block=False).share_url is None  # not in Colab: local only
    assert fake_launch.options[-1]["share"] is False and fake_launch.options[-1]["auth"] is None
    monkeypatch.setattr(environment, "in_colab", lambda: True)
    launched = app.launch(_session(), block=False)
    assert fake_launch.options[-1]["share"] is True and launched.login is not None
    assert "log in as user" in capsys.readouterr().out


def test_cli_app_reports_a_bad_login_and_exits_2(capsys):
    assert cli.main(["app", "--smoke", "--auth", "alice"]) == 2
    assert "--auth: auth must be USER:PASSWORD" in capsys.readouterr().err


def test_cli_app_options_parse():
    args = cli.build_parser().parse_args(["app", "--smoke", "--no-share", "--auth", "a:b", "--port", "7001"])
    assert (args.smoke, args.share, args.auth, args.port, args.no_auth) == (True, False, "a:b", 7001, False)
    assert cli.build_parser().parse_args(["app", "--share", "--no-auth"]).no_auth is True
    assert cli.build_parser().parse_args(["app"]).share is None


@pytest.fixture(scope="module")
def face_file(tmp_path_factory):
    from instantid_colab import smoke

    path = tmp_path_factory.mktemp("photos") / "face.png"
    smoke.sample_face_image().save(path)
    return str(path)


def test_generate_handler_passes_every_control_to_the_core_and_shows_what_it_used(smoke_session, face_file):
    handler = app._generate_handler(smoke_session)
    gallery, seed, settings, kps, notices, maps = run(
        handler, face_path=face_file, extra_face_files=[face_file], combine="norm_average", pose_path=face_file,
        negative_prompt="blurry", style="Watercolor", identitynet_strength=0.6, adapter_strength=0.7, steps=2,
        guidance_scale=1.5, seed=7, enhance_non_face=False, negative_noise=0.35, speed_mode="lcm", size="128x192",
    )  # fmt: skip
    assert seed == 7
    no_face = "likeness n/a (no face found in the generated image)"  # smoke images are noise
    assert [(image.size, caption) for image, caption in gallery] == [((128, 192), f"{SMOKE_LABEL} · #1 · {no_face}")]
    assert kps.size == (128, 192)
    assert notices == "" and maps == []
    lines = settings.splitlines()
    for expected in [
        f"**{SMOKE_LABEL}**", "| user_prompt | a person |", "| style | Watercolor |", "| seed | 7 |",
        "| steps | 2 |", "| guidance_scale | 1.5 |", "| scheduler | LCM |", "| width | 128 |", "| height | 192 |",
        "| identitynet_strength | 0.6 |", "| adapter_strength | 0.7 |", "| enhance_non_face | False |",
        "| negative_noise | 0.35 |", "| combine | norm_average |", "| reference_faces | 2 |", "| pose_image | True |",
    ]:  # fmt: skip
        assert expected in lines, expected
    assert any(line.startswith("| negative_prompt |") and line.endswith(" blurry |") for line in lines)


def test_people_section_makes_one_picture_with_a_likeness_caption_per_person(smoke_session, face_file, tmp_path):
    from instantid_colab import smoke

    other = tmp_path / "other.png"
    smoke.sample_face_image(face_color=(120, 200, 240)).save(other)
    handler = app._generate_handler(smoke_session)
    gallery, _, settings, kps, _, _ = run(handler, person_1=face_file, person_2=str(other), steps=1, size="128x128")
    (image, caption), = gallery
    assert image.size == (128, 128) and kps.size == (128, 128)
    assert re.fullmatch(rf"{SMOKE_LABEL} · #1 · person 1: likeness .+ · person 2: likeness .+", caption), caption
    assert "| reference_faces | 2 |" in settings.splitlines()
    *_, notices, _ = run(handler, face_path=face_file, person_1=face_file, person_2=str(other), steps=1,
                         size="128x128")
    assert notices == ("⚠️ The face photo above was not used: the picture is of the people under People, each from "
                       "their own photo.")
    with pytest.raises(gr.Error, match="People: give photos of 2 to 4 people"):
        run(handler, person_1=face_file, steps=1)
    with pytest.raises(gr.Error, match="order '3,1' must list the people 1 to 2 once each"):
        run(handler, person_1=face_file, person_2=str(other), order="3,1", steps=1)


def test_refine_face_box_runs_the_refine_pass_on_every_image(smoke_session, face_file):
    handler = app._generate_handler(smoke_session)
    gallery, *_ = run(handler, face_path=face_file, steps=2, size="128x128", refine_on=True, refine_strength=0.5)
    (image, _), = gallery
    refined = json.loads(image.info["instantid"])["refine_face"]
    assert refined["strength"] == 0.5 and refined["faces"] in (0, 1)


def test_face_swap_tab_returns_the_photo_with_its_swapped_face(smoke_session, tmp_path):
    from tests.pictures import COOL, picture

    target = tmp_path / "group.png"
    picture((1200, 800), [(600, 280, 240, COOL)]).save(target)
    face = tmp_path / "face.png"
    smoke.sample_face_image().save(face)
    handler = app._swap_handler(smoke_session)
    *_, (image, caption) = handler(str(target), str(face), 0, 0.6, "", 3, 4)
    metadata = json.loads(image.info["instantid"])
    assert image.size == (1200, 800) and (metadata["swap"]["strength"], metadata["steps"]) == (0.6, 4)
    assert caption.startswith(f"{SMOKE_LABEL} · face at [") and "seed 3" in caption
    with pytest.raises(gr.Error, match="Face swap: give the photo to change and a photo of the person"):
        list(handler(str(target), None, 0, 0.6, "", 3))
    with pytest.raises(gr.Error, match="The target photo has 1 face; --which 2"):
        list(handler(str(target), str(face), 2, 0.6, "", 3))


def test_generate_handler_randomizes_the_seed_and_reports_the_one_used(smoke_session, face_file):
    handler = app._generate_handler(smoke_session)
    _, seed, settings, _, _, _ = run(handler, face_path=face_file, steps=1, size="64x64", randomize_seed=True)
    assert 0 <= seed <= app.MAX_SEED
    assert f"| seed | {seed} |" in settings.splitlines()


def test_generate_handler_shows_the_no_face_advice_as_a_page_error(smoke_session, tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(grey)
    with pytest.raises(gr.Error, match="No face found.*clear, well-lit photo"):
        run(app._generate_handler(smoke_session), face_path=str(grey), steps=1, size="64x64")


def test_stop_ends_the_run_with_a_message_and_the_app_stays_usable(smoke_session, face_file):
    line = app.GpuLine()
    pressed = lambda *args, **kwargs: line.stop("me")  # noqa: E731  Stop pressed as the first step is reported
    outputs = run(app._generate_handler(smoke_session, line), face_path=face_file, steps=3, size="64x64",
                  progress=pressed, browser="me")
    assert outputs[4] == "Stopped (stopped after step 1 of 3); nothing was made. Press Generate to start again."
    assert len(line) == 0  # the place in line is given up
    gallery, *_ = run(app._generate_handler(smoke_session, line), face_path=face_file, steps=1, size="64x64",
                      browser="me")
    assert gallery[0][0].size == (64, 64)


def test_one_persons_stop_stops_only_their_own_run_waiting_or_running(smoke_session, face_file):
    line = app.GpuLine()
    handler = app._generate_handler(smoke_session, line)
    first = handler(**_handler_args(face_path=face_file, steps=4, size="64x64", seed=1), browser="ann")
    second = handler(**_handler_args(face_path=face_file, steps=2, size="64x64", seed=2), browser="bob")
    third = handler(**_handler_args(face_path=face_file, steps=2, size="64x64", seed=3), browser="cy")
    assert next(first)[4] == ""  # ann's run started (a heartbeat while it is made)
    assert next(second)[4] == "Waiting for the GPU: 1 ahead of you." and next(third)[4].endswith("2 ahead of you.")
    assert line.stop("bob") and not line.stop("nobody")
    assert list(second)[-1][4] == "Stopped before it started; nothing was made."  # bob's, while waiting
    ann = list(first)[-1]
    assert ann[1] == 1 and ann[0][0][0].size == (64, 64)  # ann's picture is made all the same
    cy = list(third)[-1]
    assert cy[1] == 3 and len(line) == 0


def test_a_click_beyond_the_line_is_refused_with_how_many_are_ahead(smoke_session, face_file):
    line = app.GpuLine(limit=1)
    handler = app._generate_handler(smoke_session, line)
    running = handler(**_handler_args(face_path=face_file, steps=2, size="64x64"), browser="ann")
    next(running)
    with pytest.raises(gr.Error, match=r"Busy: 1 pictures are ahead of you, the most this app takes at once \(1\)"):
        next(handler(**_handler_args(face_path=face_file, steps=1, size="64x64"), browser="bob"))
    with pytest.raises(gr.Error, match=r"Your earlier picture is still being made \(0 ahead of it\)"):
        next(handler(**_handler_args(face_path=face_file, steps=1, size="64x64"), browser="ann"))
    running.close()  # ann's page closed: her run stops at its next step and gives its place up
    assert len(line) == 0


@pytest.mark.parametrize(("changes", "message"), [
    (dict(steps=0), "steps 0 is out of range: use 1 to 100"),
    (dict(seed=float("nan")), "seed nan is not a number"),
    (dict(adapter_strength=50), "adapter_strength 50.0 is out of range"),
    (dict(size="1000x1000"), "multiples of 64"),
])
def test_page_refuses_values_outside_the_shared_ranges(smoke_session, face_file, changes, message):
    with pytest.raises(gr.Error, match=re.escape(message)):
        run(app._generate_handler(smoke_session), face_path=face_file, **changes)


def test_a_bug_in_the_core_becomes_a_page_message_and_the_next_click_works(smoke_session, face_file, monkeypatch):
    original = pipeline.generate
    monkeypatch.setattr(pipeline, "generate", lambda *a, **k: 1 / 0)
    with pytest.raises(gr.Error, match=r"Internal error \(ZeroDivisionError: division by zero\)\. The app is still usable"):
        run(app._generate_handler(smoke_session), face_path=face_file, steps=1, size="64x64")
    monkeypatch.setattr(pipeline, "generate", original)
    gallery, *_ = run(app._generate_handler(smoke_session), face_path=face_file, steps=1, size="64x64")
    assert gallery[0][0].size == (64, 64)


def test_page_controls_loras_and_start_photo_reach_the_core(smoke_session, face_file, tmp_path):
    edges = tmp_path / "edges.png"
    Image.new("RGB", (96, 96), (0, 255, 0)).save(edges)
    changes = dict(face_path=face_file, steps=3, size="64x64", lora_text="smoke:0.6", init_path=face_file,
                   init_strength=0.7, pose_on=True, pose_strength=0.5, pose_start=0.0, pose_end=0.5,
                   canny_on=True, canny_image=str(edges), canny_is_map=True, canny_strength=0.3, canny_start=0.2,
                   canny_end=1.0, depth_on=False, depth_strength=0.4, depth_start=0.0, depth_end=1.0)
    gallery, _, settings_text, _, notices, maps = run(app._generate_handler(smoke_session), **changes)
    assert [caption for _, caption in maps] == [
        "pose (photo) → thibaud/controlnet-openpose-sdxl-1.0", "canny (map) → diffusers/controlnet-canny-sdxl-1.0"]
    assert np.asarray(maps[1][0])[10, 10].tolist() == [0, 255, 0]  # the map as given, resized to 64x64
    assert "| loras | [{'name': 'smoke', 'scale': 0.6}] |" in settings_text.splitlines()
    assert "'strength': 0.7" in settings_text and "'source': 'map'" in settings_text
    assert gallery[0][0].size == (64, 64)


def test_page_lists_a_section_for_each_control_and_the_lora_and_start_photo_inputs():
    blocks = app.build_app(_session())
    accordions = [block.label for block in _components(blocks, gr.Accordion)]
    assert accordions == ["Advanced", "People: several in one picture", "Body pose, edges, depth (extra ControlNets)",
                          "Style LoRAs", "Start from a photo (img2img)", "Load settings", "How to read the likeness"]
    images = {image.elem_id for image in _components(blocks, gr.Image)}
    assert {"person-1", "person-2", "person-3", "person-4"} <= images
    sliders = {slider.elem_id: slider for slider in _components(blocks, gr.Slider) if slider.elem_id}
    for kind in ("pose", "canny", "depth"):
        strength = sliders[f"{kind}-strength"]
        assert (strength.minimum, strength.maximum, strength.value) == (0, 1.5, 0.4)
        assert (sliders[f"{kind}-start"].value, sliders[f"{kind}-end"].value) == (0.0, 1.0)
    assert (sliders["init-strength"].minimum, sliders["init-strength"].maximum) == (0.01, 1)


def test_a_share_link_that_cannot_be_made_still_tells_the_login_of_the_local_address(monkeypatch, capsys):
    monkeypatch.setattr(gr.Blocks, "launch", lambda blocks, **options: (None, "http://127.0.0.1:7860/", None))
    launched = app.launch(_session(), share=True, block=False)
    user, password = launched.login
    assert capsys.readouterr().out.startswith(
        "The share link could not be made (gradio's share server did not answer); the app is served at "
        f"http://127.0.0.1:7860/ only, behind the login user {user}, password {password}.")


def test_a_port_in_use_is_said_before_the_models_load():
    import socket
    import tempfile

    folders = set(Path(tempfile.gettempdir()).glob("instantid-app-*"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(app.PortInUse, match=rf"port {port} is in use"):
            app.check_port_free(port)
        with pytest.raises(app.PortInUse, match=rf"port {port} is in use"):
            app.launch(_session(), share=False, block=False, port=port)
    assert set(Path(tempfile.gettempdir()).glob("instantid-app-*")) <= folders  # its own folder went with it
    assert "GRADIO_TEMP_DIR" not in os.environ


def test_the_apps_own_folder_goes_when_python_exits_with_the_app_still_open(tmp_path):
    """A notebook launches without blocking; a restarted kernel must not leave gradio's pictures in /tmp."""
    code = ("from types import SimpleNamespace; from instantid_colab import app; "
            "print(app.launch(SimpleNamespace(smoke=True, plan=None, identity_methods=lambda: []), share=False, "
            "block=False, inline=False).cache)")
    environment = {key: value for key, value in os.environ.items() if key != "GRADIO_TEMP_DIR"}
    done = subprocess.run([sys.executable, "-c", code], env={**environment, "TMPDIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path and folder.name.startswith("instantid-app-")
    assert not folder.exists()


def test_the_page_reads_sizes_and_orders_as_the_command_line_does(smoke_session, face_file, tmp_path):
    with pytest.raises(app.InputError, match="output size '²x64' is not WIDTHxHEIGHT"):
        app.parse_size("²x64")  # "²" is a digit to Python, not a number int() reads
    other = tmp_path / "other.png"
    smoke.sample_face_image(face_color=(120, 200, 240)).save(other)
    with pytest.raises(gr.Error, match=r"order places the people on the faces of the pose \(layout\) photo"):
        run(app._generate_handler(smoke_session), person_1=face_file, person_2=str(other), order="2,1", steps=1)


def test_the_identity_method_reaches_the_core_and_the_memory_panel_says_where_it_is(smoke_session, face_file):
    handler = app._generate_handler(smoke_session)
    assert "faceid-plusv2: not loaded" in app.render_memory(None, identity_methods=smoke_session.identity_methods())
    gallery, *_ = run(handler, face_path=face_file, steps=2, size="128x128", identity="faceid-plusv2", s_scale=0.5)
    (image, _), = gallery
    metadata = json.loads(image.info["instantid"])
    assert (metadata["identity_engine"], metadata["identity_settings"]["s_scale"]) == ("faceid-plusv2", 0.5)
    panel = app.render_memory(None, identity_methods=smoke_session.identity_methods())
    assert "**Identity methods**" in panel
    assert re.search(r"faceid-plusv2: projection and IP layers on cpu \(0\.\d\d GiB.*image encoder on cpu", panel)
    with pytest.raises(gr.Error, match="refine_face repaints faces through InstantID's IdentityNet"):
        run(handler, face_path=face_file, steps=2, size="128x128", identity="faceid-plusv2", refine_on=True)


def test_load_settings_fills_the_page_from_a_bench_settings_file(tmp_path):
    path = tmp_path / "02-speed_lightning-4.json"
    path.write_text(json.dumps({"name": "speed=lightning-4, ...", "settings": {
        "speed": "lightning-4", "identitynet_strength": "0.6", "guidance_interval": "0.17,0.9", "width": 896,
        "height": "1152", "loras": "owner/style:0.8", "controls": "pose=pose.jpg:0.4"}}))
    updates = app._load_settings(str(path))
    by_field = dict(zip(settings_files.PAGE_FIELDS, updates))
    assert by_field["speed_mode"]["value"] == "lightning-4" and by_field["identitynet_strength"]["value"] == 0.6
    assert (by_field["steps"]["value"], by_field["guidance_scale"]["value"]) == (4, 0.0)  # the mode's own
    assert (by_field["guidance_from"]["value"], by_field["guidance_to"]["value"]) == (0.17, 0.9)
    assert by_field["size"]["value"] == "896x1152" and by_field["lora_text"]["value"] == "owner/style:0.8"
    assert "value" not in by_field["style"]  # not in the file: left as it is
    assert updates[-1] == f"Loaded 8 settings from {path.name}. Set these by hand: controls."
    path.write_text("{not json")
    with pytest.raises(gr.Error, match="not JSON"):
        app._load_settings(str(path))


def test_an_order_without_people_and_a_refine_that_repaints_nothing_are_said_before_the_picture(smoke_session, face_file):
    handler = app._generate_handler(smoke_session)
    _, _, _, _, notices, _ = run(handler, face_path=face_file, steps=1, size="64x64", order="2,1")
    assert "The order '2,1' was not used: it places the people under People, and there are none." in notices
    with pytest.raises(gr.Error, match=r"refine_face 0\.2 x steps 2 repaints less than one step of the refine pass"):
        run(handler, face_path=face_file, steps=2, size="64x64", refine_on=True, refine_strength=0.2)
