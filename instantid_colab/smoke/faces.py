"""Tiny ONNX face models that insightface routes like antelopev2 (smoke: random weights).

`scrfd_10g_bnkps.onnx` has SCRFD's signature (dynamic NCHW input, 9 outputs: score/bbox/kps for
strides 8/16/32, 2 anchors), so insightface's router picks SCRFD with keypoints and its real
decoding (distance2bbox, distance2kps, NMS) runs. Its "face" is a bright square on a darker
surround (not white): at stride s it fires where an 8s×8s window is bright and the ring around it (16s window)
is dark, and regresses that 8s box with 5 keypoints at fixed places inside it. A uniform black or
white image, or a face cut by the image border (no dark ring), gives no detection.
`glintr100.onnx` has ArcFace's signature (N×3×112×112 -> 512): a fixed random projection of the
8×8-pooled aligned crop, so the same face gives the same embedding and other colours differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNISER_FILE = "glintr100.onnx"
STRIDES = (8, 16, 32)
BOX_HALF = 4.0  # box half-size in stride units: a face 8 strides wide
# Keypoints in stride units from the box centre: eyes, nose, mouth corners.
KPS_OFFSETS = ((-1.6, -1.2), (1.6, -1.2), (0.0, 0.4), (-1.2, 2.0), (1.2, 2.0))
# A "face" pixel is bright but not white, on insightface's normalised input (pixel - 127.5) / 128.
BRIGHTNESS_BAND = (0.25, 0.85)
OPSET = 13
# The IR version the newest onnx writes (14) is refused by onnxruntime < 1.31; 8 is read by onnx >= 1.13 and onnxruntime >= 1.10.
IR_VERSION = 8


def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, np.float32), name))


def _detector() -> onnx.ModelProto:
    nodes = [
        _const("low", BRIGHTNESS_BAND[0]),
        _const("high", BRIGHTNESS_BAND[1]),
        _const("sharpness", 30.0),
        _const("one", 1.0),
        _const("ring_half", 0.5),
        _const("ring_gain", 4.0),
        _const("zero", 0.0),
        helper.make_node("ReduceMean", ["input.1"], ["brightness"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["brightness", "low"], ["above"]),
        helper.make_node("Mul", ["above", "sharpness"], ["above_logit"]),
        helper.make_node("Sigmoid", ["above_logit"], ["bright"]),
        helper.make_node("Sub", ["high", "brightness"], ["below"]),
        helper.make_node("Mul", ["below", "sharpness"], ["below_logit"]),
        helper.make_node("Sigmoid", ["below_logit"], ["not_white"]),
        helper.make_node("Mul", ["bright", "not_white"], ["face_px"]),
        helper.make_node("AveragePool", ["face_px"], ["face_q"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Sub", ["one", "face_q"], ["dark_q"]),
    ]
    scores, boxes, kpss = [], [], []
    box = np.full((1, 4), BOX_HALF, np.float32)
    kps = np.asarray(KPS_OFFSETS, np.float32).reshape(1, 10)
    for s in STRIDES:
        # Windows on the quarter-resolution map, centred on the anchor (x, y) = (j*s, i*s).
        step, inner, outer = s // 4, 2 * s, 4 * s
        pool = dict(strides=[step, step], count_include_pad=1)
        nodes += [
            helper.make_node("AveragePool", ["face_q"], [f"in_{s}"], kernel_shape=[inner] * 2, pads=[s, s, s - step, s - step], **pool),
            helper.make_node("AveragePool", ["dark_q"], [f"dark_in_{s}"], kernel_shape=[inner] * 2, pads=[s, s, s - step, s - step], **pool),
            helper.make_node("AveragePool", ["dark_q"], [f"dark_out_{s}"], kernel_shape=[outer] * 2, pads=[2 * s, 2 * s, 2 * s - step, 2 * s - step], **pool),
            # Dark fraction of the ring between the two windows (areas 4:1); outside the image counts as not dark.
            _const(f"four_{s}", 4.0),
            _const(f"third_{s}", 1.0 / 3.0),
            helper.make_node("Mul", [f"dark_out_{s}", f"four_{s}"], [f"dark_out4_{s}"]),
            helper.make_node("Sub", [f"dark_out4_{s}", f"dark_in_{s}"], [f"ring3_{s}"]),
            helper.make_node("Mul", [f"ring3_{s}", f"third_{s}"], [f"ring_{s}"]),
            helper.make_node("Sub", [f"ring_{s}", "ring_half"], [f"ring_c_{s}"]),
            helper.make_node("Mul", [f"ring_c_{s}", "ring_gain"], [f"ring_g_{s}"]),
            helper.make_node("Clip", [f"ring_g_{s}", "zero", "one"], [f"ring_ok_{s}"]),
            helper.make_node("Mul", [f"in_{s}", f"in_{s}"], [f"in2_{s}"]),
            helper.make_node("Mul", [f"in2_{s}", f"ring_ok_{s}"], [f"score_map_{s}"]),
            helper.make_node("Constant", [], [f"shape_{s}"], value=numpy_helper.from_array(np.array([-1, 1], np.int64))),
            helper.make_node("Reshape", [f"score_map_{s}", f"shape_{s}"], [f"score_loc_{s}"]),
            helper.make_node("Concat", [f"score_loc_{s}", f"score_loc_{s}"], [f"score_anchor_{s}"], axis=1),
            helper.make_node("Reshape", [f"score_anchor_{s}", f"shape_{s}"], [f"score_{s}"]),
            helper.make_node("Mul", [f"score_{s}", "zero"], [f"zeros_{s}"]),
            _const(f"box_{s}", box),
            _const(f"kps_{s}", kps),
            helper.make_node("Add", [f"zeros_{s}", f"box_{s}"], [f"bbox_{s}"]),
            helper.make_node("Add", [f"zeros_{s}", f"kps_{s}"], [f"kps_out_{s}"]),
        ]
        scores.append(helper.make_tensor_value_info(f"score_{s}", TensorProto.FLOAT, [f"n{s}", 1]))
        boxes.append(helper.make_tensor_value_info(f"bbox_{s}", TensorProto.FLOAT, [f"n{s}", 4]))
        kpss.append(helper.make_tensor_value_info(f"kps_out_{s}", TensorProto.FLOAT, [f"n{s}", 10]))
    graph = helper.make_graph(
        nodes,
        "smoke_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        scores + boxes + kpss,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def recogniser_model(seed: int = 0) -> onnx.ModelProto:
    projection = np.random.default_rng(seed).standard_normal((3 * 8 * 8, 512)).astype(np.float32) * 0.15
    nodes = [
        helper.make_node("AveragePool", ["data"], ["pooled"], kernel_shape=[14, 14], strides=[14, 14], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1, name="flatten"),
        _const("projection", projection),
        helper.make_node("MatMul", ["features", "projection"], ["fc1"], name="project"),
    ]
    graph = helper.make_graph(
        nodes,
        "smoke_arcface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["batch", 512])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def write_smoke_face_models(root: Path, name: str = "antelopev2") -> Path:
    """Write the two tiny models into `root/models/<name>/` (insightface's layout); return that folder."""
    folder = Path(root) / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    for filename, model in ((DETECTOR_FILE, _detector()), (RECOGNISER_FILE, recogniser_model())):
        onnx.checker.check_model(model)
        onnx.save(model, str(folder / filename))
    return folder


def smoke_face_box(center: tuple[float, float], stride: int) -> np.ndarray:
    """The box the smoke detector regresses for an anchor: x1, y1, x2, y2 (for tests)."""
    half = BOX_HALF * stride
    return np.array([center[0] - half, center[1] - half, center[0] + half, center[1] + half], np.float32)
