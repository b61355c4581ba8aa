"""What running the extra ControlNets takes: the maps they see, and the nets themselves.

Canny with OpenCV (the official thresholds), depth with Depth Anything V2 small and body pose with
ViTPose, both through transformers on the CPU and freed after; the nets are loaded by the memory
plan's placement (`memory.plan_controls`) and kept for the next call. diffusers' MultiControlNetModel
sums the residuals, the pipeline's per-net `control_guidance_start/end` schedules, and
`identity.IdentityNet` swaps in the face tokens. Which kinds and models exist is `controls`.
"""

from __future__ import annotations

import gc
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

try:  # re-exported for the pipeline: one place knows where diffusers keeps it
    from diffusers import MultiControlNetModel  # noqa: F401
except ImportError:  # diffusers < 0.32 kept it under pipelines
    from diffusers.pipelines.controlnet.multicontrolnet import MultiControlNetModel  # noqa: F401

from instantid_colab.components import pil_image_processor
from instantid_colab.controls import Control, image_digest
from instantid_colab.settings import SettingsError
from instantid_colab.weights import reading

CANNY_THRESHOLDS = (100, 200)  # the official get_canny_image
POSE_MIN_SCORE = 0.3  # OpenPose/DWPose drop keypoints below this confidence


# ---------------------------------------------------------------------------------------------
# Annotators


def canny_map(image: Image.Image) -> Image.Image:
    """The official get_canny_image: OpenCV Canny(100, 200) of the photo, white edges on black."""
    edges = cv2.Canny(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR), *CANNY_THRESHOLDS)
    return Image.fromarray(edges, "L").convert("RGB")


def depth_map(image: Image.Image, folder: Path) -> Image.Image:
    """Relative depth (near = bright) from Depth Anything V2, min-max scaled, as the official get_depth_map."""
    from transformers import AutoModelForDepthEstimation

    with reading("the depth annotator", folder):
        processor = pil_image_processor("DPTImageProcessor").from_pretrained(folder)  # Depth Anything V2's own
        model = AutoModelForDepthEstimation.from_pretrained(folder).eval()
    try:
        with torch.no_grad():
            depth = model(**processor(images=image, return_tensors="pt")).predicted_depth
    finally:
        del model
        gc.collect()
    depth = torch.nn.functional.interpolate(depth[:, None].float(), size=image.size[::-1], mode="bicubic",
                                            align_corners=False)[0, 0]
    depth = (depth - depth.min()) / (depth.max() - depth.min()).clamp_min(1e-8)
    grey = (depth * 255.0).clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(grey, "L").convert("RGB")


# OpenPose's 18 body keypoints from COCO's 17 (ViTPose): index in COCO order, "neck" = mid-shoulders.
OPENPOSE_FROM_COCO = (0, "neck", 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
# OpenPose's limbs (1-based keypoint pairs) and colours, as its body renderer draws them; the openpose
# ControlNets were trained on such drawings (written here: a 20-line table, not worth a dependency).
OPENPOSE_LIMBS = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
                  (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18))
OPENPOSE_COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
                   (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
                   (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))


def openpose_keypoints(coco: np.ndarray, scores: np.ndarray) -> list[tuple[float, float] | None]:
    """COCO-17 (x, y) + scores -> OpenPose-18 points, None where not confidently seen."""
    seen = [tuple(map(float, point)) if score >= POSE_MIN_SCORE else None for point, score in zip(coco, scores)]
    points = []
    for index in OPENPOSE_FROM_COCO:
        if index == "neck":
            left, right = seen[5], seen[6]
            points.append(None if left is None or right is None else ((left[0] + right[0]) / 2, (left[1] + right[1]) / 2))
        else:
            points.append(seen[index])
    return points


def draw_openpose(size: tuple[int, int], points: list[tuple[float, float] | None]) -> Image.Image:
    """OpenPose's body drawing: limbs as 4-px ellipses at 0.6 of their colour, joints as 4-px dots, on black."""
    width, height = size
    canvas = np.zeros((height, width, 3), np.uint8)
    for (a, b), color in zip(OPENPOSE_LIMBS, OPENPOSE_COLORS):
        first, second = points[a - 1], points[b - 1]
        if first is None or second is None:
            continue
        (x1, y1), (x2, y2) = first, second
        length = math.hypot(x1 - x2, y1 - y2)
        angle = math.degrees(math.atan2(y1 - y2, x1 - x2))
        polygon = cv2.ellipse2Poly((int((x1 + x2) / 2), int((y1 + y2) / 2)), (int(length / 2), 4), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(c * 0.6) for c in color])
    for point, color in zip(points, OPENPOSE_COLORS):
        if point is not None:
            cv2.circle(canvas, (int(point[0]), int(point[1])), 4, color, thickness=-1)
    return Image.fromarray(canvas)


def pose_map(image: Image.Image, folder: Path) -> Image.Image:
    """The body skeleton of the person in the photo (ViTPose, top-down on the whole picture as the person's box)."""
    try:
        from transformers import VitPoseForPoseEstimation
    except ImportError:
        raise SettingsError(["pose from a photo needs transformers >= 4.49 (ViTPose): run `python -m instantid_colab "
                             "install`, or give a drawn skeleton as a map (--control-map pose=skeleton.png)"]) from None
    from transformers import AutoProcessor

    with reading("the pose annotator", folder):
        processor = AutoProcessor.from_pretrained(folder)
        model = VitPoseForPoseEstimation.from_pretrained(folder).eval()
    boxes = [[[0.0, 0.0, float(image.width), float(image.height)]]]  # COCO x, y, w, h
    try:
        with torch.no_grad():
            outputs = model(**processor(image, boxes=boxes, return_tensors="pt"))
    finally:
        del model
        gc.collect()
    person = processor.post_process_pose_estimation(outputs, boxes=boxes)[0][0]
    points = openpose_keypoints(np.asarray(person["keypoints"], np.float64), np.asarray(person["scores"], np.float64))
    return draw_openpose(image.size, points)


class Annotations:
    """Maps made from photos, remembered by (kind, picture) so a batch or a re-run annotates once."""

    def __init__(self, capacity: int = 16):
        self._maps: OrderedDict[tuple[str, str], Image.Image] = OrderedDict()
        self.capacity = capacity

    def get(self, kind: str, image: Image.Image, annotator_folder) -> Image.Image:
        key = (kind, image_digest(image))
        if key not in self._maps:
            if kind == "canny":
                made = canny_map(image)
            else:
                folder = annotator_folder(kind)
                made = pose_map(image, folder) if kind == "pose" else depth_map(image, folder)
            self._maps[key] = made
            if len(self._maps) > self.capacity:
                self._maps.popitem(last=False)
        self._maps.move_to_end(key)
        return self._maps[key]


def control_map(control: Control, source: Image.Image, size: tuple[int, int], annotations: Annotations,
                annotator_folder) -> Image.Image:
    """The picture its ControlNet sees, at output size: the given map, or the annotation of the given photo."""
    made = source if control.is_map else annotations.get(control.kind, source, annotator_folder)
    return made.resize(size, Image.BILINEAR)


# ---------------------------------------------------------------------------------------------
# The loaded extra ControlNets


class ControlNets:
    """The extra ControlNets of a session, loaded once per (kind, variant, place) and freed when no longer asked for."""

    def __init__(self):
        self.loaded: dict[str, tuple[Any, Any]] = {}  # kind -> (ControlPlacement, model)

    def gib_on_gpu(self) -> float:
        return sum(placement.gib for placement, _ in self.loaded.values() if placement.place == "gpu")

    def prepare(self, placements, folder_of, device: str, dtype: torch.dtype) -> list:
        """Free what is not wanted, load what is missing; returns the models in `placements` order."""
        from diffusers import ControlNetModel

        from instantid_colab import components, memory

        wanted = {placement.kind: placement for placement in placements}
        unwanted = [kind for kind, (placement, _) in self.loaded.items() if wanted.get(kind) != placement]
        for kind in unwanted:
            del self.loaded[kind]
        if unwanted:
            memory.cleanup()
        for placement in placements:
            if placement.kind in self.loaded:
                continue
            folder = folder_of(placement.kind, placement.variant)
            on_gpu = placement.place == "gpu"
            model = components.load(ControlNetModel, folder, device if on_gpu else "cpu",
                                    dtype if placement.place != "cpu" else torch.float32, variant="fp16")
            if placement.place == "offload":
                from accelerate import cpu_offload

                cpu_offload(model, execution_device=torch.device(device))
            self.loaded[placement.kind] = (placement, model.eval())
        return [self.loaded[placement.kind][1] for placement in placements]
