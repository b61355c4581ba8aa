"""Face analysis for InstantID: insightface detection + ArcFace embedding, keypoint drawing, combining.

insightface does the detection and recognition; this module adds what the official demo lacks:
any input image (through `images.open_image`), very large photos detected on a downscaled copy,
retries before giving up (smaller detection sizes, then a padded copy for tight crops), and an error
a person can act on.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from instantid_colab.images import ImageLike, open_image
from instantid_colab.settings import COMBINE_MODES, check_arguments
from instantid_colab.weights import reading


RETRY_DET_SIZES = (640, 480, 320, 256)  # after the configured size; cubiq's node also walks down
PAD_FRACTION = 0.5  # padding per side, as a fraction of the longer side, for the tight-crop retry
MAX_DETECT_SIDE = 2048  # larger photos are detected on a downscaled copy (memory and time)
FACE_CACHE = 16  # photos whose face is remembered
KPS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
NO_FACE_ADVICE = (
    "Use a clear, well-lit photo with one face looking roughly at the camera, at least about a tenth "
    "of the picture wide, not cut off at the forehead or chin (a less tight crop helps), without "
    "sunglasses or heavy occlusion."
)


class NoFaceError(ValueError):
    """No face was found, even after the retries; the message says what photo to use instead."""


NO_FACE_IN_OUTPUT = "no face found in the generated image"


@dataclass(frozen=True)
class Likeness:
    """How much a generated image looks like the person: ArcFace cosine similarity, or None and why not."""

    similarity: float | None
    note: str | None = None

    def render(self) -> str:
        return f"likeness {self.similarity:.2f}" if self.similarity is not None else f"likeness n/a ({self.note})"


def reference_direction(embedding: np.ndarray) -> np.ndarray:
    """The unit identity vector a generation used: the mean direction of its embedding rows (any width: ArcFace's
    512, a judge's 128). One row for "average"/"norm_average"; with "concat" every photo's row counts equally.
    """
    rows = np.asarray(embedding, dtype=np.float64).reshape(-1, np.shape(embedding)[-1])
    direction = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).mean(axis=0)
    return direction / np.linalg.norm(direction)


def likeness_of(reference: np.ndarray, face: Face) -> Likeness:
    """Cosine similarity of `face`'s ArcFace embedding with the identity `reference` was made from."""
    found = face.embedding / np.linalg.norm(face.embedding)
    return Likeness(round(float(np.dot(reference_direction(reference), found)), 4))


@dataclass
class Face:
    """The face InstantID uses: box and keypoints in the ORIGINAL image's pixels, raw ArcFace embedding."""

    bbox: np.ndarray  # (4,) x1, y1, x2, y2
    kps: np.ndarray  # (5, 2) eyes, nose, mouth corners
    embedding: np.ndarray  # (512,) float32, insightface's raw `embedding` (what the official app feeds)
    det_score: float

    def copy(self) -> Face:
        return Face(self.bbox.copy(), self.kps.copy(), self.embedding.copy(), self.det_score)

    @property
    def area(self) -> float:
        return float((self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1]))


def _detection_copy(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """BGR for insightface, at most MAX_DETECT_SIDE a side, and the scale to map its coordinates back."""
    scale = min(1.0, MAX_DETECT_SIDE / max(rgb.shape[:2]))
    if scale < 1.0:
        size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb[:, :, ::-1]), scale


def draw_kps(size: tuple[int, int], kps: np.ndarray) -> Image.Image:
    """The IdentityNet condition image: the official `draw_kps` (pipeline_stable_diffusion_xl_instantid.py).

    Written here because it is 15 lines in a repository that is not a package. Black canvas of
    `size` (width, height); limbs 0-2, 1-2, 3-2, 4-2 as filled ellipses 4 px wide, dimmed ×0.6;
    then filled circles of radius 10 coloured R, G, B, Y, M at the 5 keypoints.
    """
    width, height = size
    kps = np.asarray(kps, dtype=np.float64)
    canvas = np.zeros((height, width, 3), dtype=np.float64)
    for start, end in ((0, 2), (1, 2), (3, 2), (4, 2)):
        x, y = kps[[start, end], 0], kps[[start, end], 1]
        length = math.hypot(x[0] - x[1], y[0] - y[1])
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly(
            (int(np.mean(x)), int(np.mean(y))), (int(length / 2), 4), int(angle), 0, 360, 1
        )
        canvas = cv2.fillConvexPoly(canvas, polygon, KPS_COLORS[start])
    canvas = (canvas * 0.6).astype(np.uint8)
    for (x, y), color in zip(kps, KPS_COLORS):
        canvas = cv2.circle(canvas, (int(x), int(y)), 10, color, -1)
    return Image.fromarray(canvas)


def combine_embeddings(embeddings: np.ndarray | list[np.ndarray], mode: str = "average") -> np.ndarray:
    """Several reference photos -> the Resampler's input (ComfyUI_InstantID's three options).

    average: mean of the raw embeddings, (1, 512). norm_average: mean of unit-length embeddings,
    rescaled to the inputs' mean length so the Resampler sees the magnitude it was trained on
    (each photo counts equally however confident ArcFace was), (1, 512). concat: all of them,
    (N, 512), each becoming its own set of face tokens.
    """
    stack = np.stack([np.asarray(e, dtype=np.float32).reshape(-1) for e in embeddings])
    if mode == "average":
        return stack.mean(axis=0, keepdims=True)
    if mode == "norm_average":
        norms = np.linalg.norm(stack, axis=1, keepdims=True)
        direction = (stack / norms).mean(axis=0, keepdims=True)
        return direction / np.linalg.norm(direction) * norms.mean()
    if mode == "concat":
        return stack
    raise ValueError(f"combine must be one of {', '.join(COMBINE_MODES)}, not {mode!r}")


def _providers(device: str) -> list[str]:
    import onnxruntime

    if device == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _model_dir(root: Path, name: str) -> Path:
    folder = Path(root).expanduser().resolve() / "models" / name
    if any(folder.glob("*.onnx")):
        return folder
    nested = folder / name
    hint = (
        f" The files are one level too deep in {nested}: move them up into {folder}."
        if any(nested.glob("*.onnx"))
        else " Download antelopev2 (weights.ensure_weights does; insightface's own link is dead)."
    )
    raise FileNotFoundError(f"No face models (*.onnx) in {folder}.{hint}")


class FaceAnalyzer:
    """insightface's FaceAnalysis on a local model folder (never downloads), detection + recognition only.

    The landmark and gender/age models of antelopev2 are not loaded: InstantID uses only the
    detector's 5 keypoints and the ArcFace embedding.
    """

    def __init__(self, root: Path, name: str = "antelopev2", device: str = "cpu", det_size: int = 640,
                 device_index: int = 0):
        """`device_index`: which GPU onnxruntime uses (one process per GPU in a multi-GPU batch)."""
        from insightface.app import FaceAnalysis

        (self.det_size,) = check_arguments(det_size=(det_size, "det_size"))
        folder = _model_dir(root, name)
        self._found: OrderedDict[tuple, Face] = OrderedDict()  # photo -> face: a batch or the app reuses photos
        requested = _providers(device)
        # An absolute folder as `name`: insightface >=2 uses it directly, 0.7.x joins it onto root
        # (os.path.join keeps the absolute part), so neither looks for a download.
        options = dict(name=str(folder), root=str(Path(root).expanduser()), allowed_modules=["detection", "recognition"])
        if "CUDAExecutionProvider" in requested:
            options["provider_options"] = [{"device_id": device_index}, {}]
        with reading(f"the face models ({name})", folder):
            try:
                self._app = FaceAnalysis(providers=requested, **options)
            except Exception as error:
                if requested == ["CPUExecutionProvider"]:
                    raise
                warnings.warn(f"onnxruntime CUDA failed ({error}); face analysis runs on CPU.", stacklevel=2)
                requested = ["CPUExecutionProvider"]
                options.pop("provider_options")
                self._app = FaceAnalysis(providers=requested, **options)
        if "recognition" not in self._app.models:
            raise FileNotFoundError(f"{folder} has a detector but no ArcFace recognition model (glintr100.onnx).")
        self._app.prepare(ctx_id=0 if "CUDAExecutionProvider" in requested else -1, det_size=(self.det_size,) * 2)
        if "CUDAExecutionProvider" in requested and "CUDAExecutionProvider" not in self.providers:
            warnings.warn(
                "onnxruntime could not start CUDA (onnxruntime-gpu built for another CUDA?); face analysis runs on CPU.",
                stacklevel=2,
            )

    @property
    def providers(self) -> list[str]:
        """The execution providers onnxruntime really uses for the detector."""
        return list(self._app.det_model.session.get_providers())

    def detect(self, image: ImageLike, retries: bool = True) -> Face:
        """The largest face, with box/keypoints in `image`'s (EXIF-upright) pixel coordinates.

        `retries=False` tries the configured detection size only (no smaller sizes, no padded copy).
        """
        rgb = np.asarray(open_image(image, "face photo", max_side=None))  # the caller's coordinates; _detect shrinks
        if not retries:  # a generated picture: never seen before, not worth remembering
            return self._detect(rgb, retries)
        key = (hashlib.blake2b(rgb.tobytes(), digest_size=16).digest(), rgb.shape)
        if key in self._found:
            self._found.move_to_end(key)
            return self._found[key].copy()
        face = self._detect(rgb, retries)
        self._found[key] = face.copy()
        if len(self._found) > FACE_CACHE:
            self._found.popitem(last=False)
        return face

    def _detect(self, rgb: np.ndarray, retries: bool) -> Face:
        bgr, scale = _detection_copy(rgb)
        face = self._find(bgr, self._det_sizes() if retries else [self.det_size])
        if face is None and not retries:
            raise NoFaceError(f"No face found at detection size {self.det_size}.")
        if face is None:
            pad = int(PAD_FRACTION * max(bgr.shape[:2]))
            padded = cv2.copyMakeBorder(bgr, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            face = self._find(padded, self._det_sizes())
            if face is not None:
                face.bbox -= pad
                face.kps -= pad
        if face is None:
            sizes = "/".join(str(s) for s in self._det_sizes())
            raise NoFaceError(f"No face found (tried detection sizes {sizes} and a padded copy). {NO_FACE_ADVICE}")
        face.bbox /= scale
        face.kps /= scale
        return face

    def detect_all(self, image: ImageLike) -> list[Face]:
        """Every face found at the first detection size that finds any, left to right by box centre, in
        `image`'s pixel coordinates, each with its embedding (a layout photo of several people, or a picture
        made of them). Empty when there is none."""
        bgr, scale = _detection_copy(np.asarray(open_image(image, "layout photo", max_side=None)))
        for size in self._det_sizes():
            boxes, kpss = self._app.det_model.detect(bgr, input_size=(size, size))
            if len(boxes):
                found = [self._embedded(bgr, box, kps) for box, kps in zip(boxes, kpss)]
                for face in found:
                    face.bbox /= scale
                    face.kps /= scale
                return sorted(found, key=lambda face: face.bbox[0] + face.bbox[2])
        return []

    def _det_sizes(self) -> list[int]:
        return [self.det_size] + [s for s in RETRY_DET_SIZES if s < self.det_size]

    def _find(self, bgr: np.ndarray, sizes: list[int]) -> Face | None:
        """Largest face at the first detection size that finds one; embedding for that face only."""
        for size in sizes:
            boxes, kpss = self._app.det_model.detect(bgr, input_size=(size, size))
            if len(boxes):
                best = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
                return self._embedded(bgr, boxes[best], kpss[best])
        return None

    def _embedded(self, bgr: np.ndarray, box: np.ndarray, kps: np.ndarray) -> Face:
        """One detection with its ArcFace embedding (insightface aligns the face by its keypoints)."""
        from insightface.app.common import Face as InsightFace

        found = InsightFace(bbox=box[:4], kps=kps, det_score=box[4])
        self._app.models["recognition"].get(bgr, found)
        return Face(bbox=found.bbox.astype(np.float64), kps=found.kps.astype(np.float64),
                    embedding=np.asarray(found.embedding, dtype=np.float32), det_score=float(found.det_score))

    def likeness(self, reference: np.ndarray, image: ImageLike) -> Likeness:
        """Cosine similarity between `reference` (the generation's identity embedding) and the largest
        face in `image`: the measure ArcFace was trained for (same person scores high, strangers near 0).
        One detection pass at the configured size: a generated portrait needs no retries."""
        try:
            face = self.detect(image, retries=False)
        except NoFaceError:
            return Likeness(None, NO_FACE_IN_OUTPUT)
        return likeness_of(reference, face)

    def embed(self, images: ImageLike | list[ImageLike], combine: str = "average") -> tuple[np.ndarray, Face]:
        """Embedding for one or several photos of the same person, and the first photo's face (for keypoints)."""
        images = images if isinstance(images, (list, tuple)) else [images]
        faces = [self.detect(image) for image in images]
        return combine_embeddings([face.embedding for face in faces], combine), faces[0]
