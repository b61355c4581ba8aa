"""Extra ControlNets, annotators, their memory placement, and img2img (smoke: random weights, CPU)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image

from instantid_colab import controlnets, controls, memory, pipeline, smoke
from instantid_colab.controls import Control
from instantid_colab.engines.instantid import IdentityNet
from instantid_colab.settings import SettingsError

SIZE = dict(width=128, height=128)
COLORS = {"pose": (255, 0, 0), "canny": (0, 255, 0), "depth": (0, 0, 255)}


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    weights = smoke.build_smoke_weights(tmp_path_factory.mktemp("smoke"))
    return pipeline.load_pipeline(weights, memory.choose_plan(16, None), progress=False)


@pytest.fixture(scope="module")
def face():
    return smoke.sample_face_image()


def solid(color) -> Image.Image:
    return Image.new("RGB", (96, 96), color)


@pytest.fixture
def calls(monkeypatch):
    """Every ControlNet forward: which net, its text context, its condition image and its scale."""
    seen = []
    original = ControlNetModel.forward

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0, *args, **kwargs):
        seen.append({"net": self, "identitynet": isinstance(self, IdentityNet), "context": encoder_hidden_states,
                     "cond": controlnet_cond.detach().clone(), "scale": float(conditioning_scale)})
        return original(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, *args, **kwargs)

    monkeypatch.setattr(ControlNetModel, "forward", forward)
    return seen


def test_each_map_reaches_its_controlnet_with_the_right_context(session, face, calls):
    maps = [Control(kind, solid(color), strength, is_map=True) for (kind, color), strength in zip(COLORS.items(), (0.3, 0.5, 0.7))]
    result = pipeline.generate(session, face, "a dancer", steps=1, seed=1, controls=maps, **SIZE)
    identity, *extra = calls[:4]
    # The official rule: the IdentityNet's context is the 16 face tokens, every other net gets the 77 text tokens.
    assert identity["identitynet"] and identity["scale"] == pytest.approx(0.8)
    assert tuple(identity["context"].shape[:2]) == (2, 16)
    assert [call["identitynet"] for call in extra] == [False, False, False]
    for call, (kind, color), strength in zip(extra, COLORS.items(), (0.3, 0.5, 0.7)):
        assert tuple(call["context"].shape[:2]) == (2, 77), kind
        assert call["scale"] == pytest.approx(strength), kind
        channel_means = call["cond"][0].mean(dim=(1, 2))  # the prepared condition image, in [0, 1]
        assert torch.allclose(channel_means, torch.tensor(color, dtype=torch.float32) / 255, atol=1e-3), kind
    assert [c["kind"] for c in result.settings["controls"]] == ["pose", "canny", "depth"]
    assert [c["source"] for c in result.settings["controls"]] == ["map"] * 3
    assert [m.size for m in result.control_maps] == [(128, 128)] * 3


def test_start_and_end_switch_a_control_on_for_its_fraction_of_the_steps(session, face, calls):
    depth = Control("depth", solid(COLORS["depth"]), 0.6, start=0.2, end=0.6, is_map=True)
    pipeline.generate(session, face, steps=10, seed=2, controls=[depth], **SIZE)
    depth_scales = [call["scale"] for call in calls if not call["identitynet"]]
    identity_scales = [call["scale"] for call in calls if call["identitynet"]]
    # diffusers' keep rule: step i runs when start <= i/10 and (i+1)/10 <= end
    assert depth_scales == pytest.approx([0, 0, 0.6, 0.6, 0.6, 0.6, 0, 0, 0, 0])
    assert identity_scales == pytest.approx([0.8] * 10)


def test_photos_are_annotated_once_and_maps_are_used_as_given(session, face, calls, monkeypatch):
    made = []
    original = controlnets.canny_map
    monkeypatch.setattr(controlnets, "canny_map", lambda image: made.append(1) or original(image))
    for seed in (3, 4):
        result = pipeline.generate(session, face, steps=1, seed=seed, controls=[Control("canny", face)], **SIZE)
    assert made == [1]  # the second run reused the annotation of the same photo
    expected = cv2.Canny(cv2.cvtColor(np.asarray(face), cv2.COLOR_RGB2BGR), 100, 200)
    expected = np.asarray(Image.fromarray(expected).convert("RGB").resize((128, 128), Image.BILINEAR))
    assert np.array_equal(np.asarray(result.control_maps[0]), expected)
    assert result.settings["controls"][0]["source"] == "photo"


def test_pose_and_depth_annotators_run_through_transformers(session, face):
    pose = session.annotations.get("pose", face, session.annotator_folder)
    depth = session.annotations.get("depth", face, session.annotator_folder)
    assert pose.size == depth.size == face.size
    grey = np.asarray(depth)
    assert grey.min() == 0 and grey.max() == 255 and np.array_equal(grey[..., 0], grey[..., 2])


def test_depth_needs_no_torchvision(session, face, monkeypatch):
    """transformers 5.15 without torchvision: AutoImageProcessor raises ImportError (Colab has torchvision; another
    machine with that transformers got "internal error"). The depth annotator uses the PIL processor by name."""
    import transformers

    from instantid_colab.components import pil_image_processor

    def torchvision_missing(*args, **kwargs):
        raise ImportError("AutoImageProcessor requires the Torchvision library but it was not found")

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", torchvision_missing)
    expected = getattr(transformers, "DPTImageProcessorPil", None) or transformers.DPTImageProcessor
    assert pil_image_processor("DPTImageProcessor") is expected  # transformers 5: the ...Pil class
    depth = controlnets.depth_map(face, session.annotator_folder("depth"))
    assert depth.size == face.size and np.asarray(depth).max() == 255


def test_openpose_keypoints_from_coco_add_the_neck_and_drop_unsure_points():
    coco = np.array([[float(i), float(10 * i)] for i in range(17)])
    scores = np.ones(17)
    scores[9] = 0.1  # left wrist not seen
    points = controlnets.openpose_keypoints(coco, scores)
    assert len(points) == 18
    assert points[0] == (0.0, 0.0)  # nose
    assert points[1] == ((5 + 6) / 2, (50 + 60) / 2)  # neck = between the shoulders
    assert points[2] == (6.0, 60.0) and points[5] == (5.0, 50.0)  # right / left shoulder
    assert points[7] is None  # the left wrist in OpenPose order
    assert points[14] == (2.0, 20.0) and points[17] == (3.0, 30.0)  # right eye, left ear


def test_openpose_drawing_colours_joints_and_dims_limbs():
    points = [None] * 18
    points[1], points[2] = (50.0, 50.0), (90.0, 50.0)  # neck -> right shoulder, limb 0 (red)
    image = np.asarray(controlnets.draw_openpose((128, 100), points))
    assert tuple(image[50, 50]) == (255, 85, 0) and tuple(image[50, 90]) == (255, 170, 0)  # joint dots, full colour
    assert tuple(image[50, 70]) == (153, 0, 0)  # the limb between them: red x 0.6
    assert tuple(image[10, 10]) == (0, 0, 0)


@pytest.mark.parametrize(("given", "message"), [
    ([Control("hands", "x.png")], "control 'hands' is not one of: pose, canny, depth"),
    ([Control("pose", "x.png", 2.0)], "pose strength 2.0 is out of range: use 0 to 1.5"),
    ([Control("depth", "x.png", start=0.7, end=0.3)], "depth range 0.7:0.3: start must be before end"),
    ([Control("canny", "a.png"), Control("canny", "b.png")], "control canny is given twice"),
    ([Control("canny", "a.png", end=float("nan"))], "canny end nan is not a number"),
])
def test_bad_controls_are_refused_before_any_work(given, message):
    with pytest.raises(SettingsError, match=message.replace("(", "\\(").replace(")", "\\)")):
        controls.check_controls(given)


def test_control_and_range_parsing():
    assert controls.parse_control("pose=dancer.jpg:0.6") == Control("pose", "dancer.jpg", "0.6")
    assert controls.parse_control("Canny=edges.png", is_map=True) == Control("canny", "edges.png", 0.4, is_map=True)
    assert controls.parse_range("depth=0.1:0.8") == ("depth", "0.1", "0.8")
    with pytest.raises(SettingsError, match="is not KIND=IMAGE"):
        controls.parse_control("dancer.jpg")
    with pytest.raises(SettingsError, match="--control-range canny: there is no canny control"):
        controls.with_ranges([Control("pose", "x")], [("canny", 0, 1)])


T4_AFTER_BASE = 14.75 - 10.16  # the T4 cap minus the weights choose_plan keeps there (UNet, IdentityNet, text, VAE, faces)


@pytest.mark.parametrize(("kinds", "expected"), [
    (["pose"], [("pose", "full", "gpu")]),
    (["canny"], [("canny", "full", "gpu")]),
    (["pose", "canny", "depth"], [("pose", "full", "gpu"), ("canny", "small", "offload"), ("depth", "small", "offload")]),
    (["depth", "canny"], [("depth", "small", "gpu"), ("canny", "small", "gpu")]),
])
def test_control_placement_on_the_free_colab_budget(kinds, expected):
    plan = memory.choose_plan(11.0, 14.7)
    placements = memory.plan_controls(plan, controls.options(kinds), T4_AFTER_BASE, 11.0 - 1.4)
    assert [(p.kind, p.variant, p.place) for p in placements] == expected


def test_control_placement_without_gpu_and_when_nothing_fits():
    cpu = memory.plan_controls(memory.choose_plan(16, None), controls.options(["pose", "depth"]), None, 10)
    assert [(p.kind, p.place) for p in cpu] == [("pose", "cpu"), ("depth", "cpu")]
    with pytest.raises(MemoryError, match="Not enough memory for the pose ControlNet: its lightest variant needs 2.33 GiB"):
        memory.plan_controls(memory.choose_plan(11.0, 14.7), controls.options(["pose"]), 1.0, 2.0)


def test_start_photo_repaints_its_fraction_of_the_steps_with_the_face_tokens(session, face, calls):
    steps = []
    result = pipeline.generate(session, face, steps=10, seed=5, init_image=solid((200, 120, 40)), init_strength=0.6,
                               callback=lambda step, total: steps.append((step, total)), **SIZE)
    assert steps == [(step, 6) for step in range(1, 7)]  # int(10 x 0.6) denoising steps
    assert all(call["identitynet"] and call["context"].shape[1] == 16 for call in calls)
    assert result.settings["init_image"]["strength"] == 0.6 and len(result.settings["init_image"]["image_sha256"]) == 16
    plain = pipeline.generate(session, face, steps=10, seed=5, **SIZE)
    assert np.abs(np.asarray(plain.images[0], np.int16) - np.asarray(result.images[0], np.int16)).mean() > 1


def test_start_photo_strength_too_small_for_the_steps():
    with pytest.raises(SettingsError, match="repaints less than one step"):
        pipeline.generate(None, "face.png", steps=4, init_image="start.png", init_strength=0.1)


def test_doctor_outlook_for_a_free_colab_t4():
    plan = memory.choose_plan(11.0, 14.7)
    combos = {"+pose": controls.options(["pose"]), "+all": controls.options(["pose", "canny", "depth"])}
    outlook = memory.controls_outlook(plan, combos, 14.7, 11.0)
    assert [(p.kind, p.variant, p.place) for p in outlook["+pose"]] == [("pose", "full", "gpu")]
    assert [(p.kind, p.variant, p.place) for p in outlook["+all"]] == [
        ("pose", "full", "gpu"), ("canny", "small", "offload"), ("depth", "small", "offload")]
    assert outlook["+all"][1].render() == "canny ControlNet (small, 0.31 GiB) in RAM, streamed to the GPU each step (slower)"
    tight = memory.controls_outlook(memory.choose_plan(3.0, 7.5), {"+pose": controls.options(["pose"])}, 7.5, 3.0)
    assert "Not enough memory for the pose ControlNet" in tight["+pose"]


def test_memory_panel_lists_the_loaded_extra_controlnets():
    from instantid_colab import app

    placement = memory.ControlPlacement("depth", "small", "gpu", 0.30)
    text = app.render_memory(memory.choose_plan(11.0, 14.7), extra=[placement])
    assert text.endswith("**Extra ControlNets**\n- depth ControlNet (small, 0.30 GiB) on the GPU")
