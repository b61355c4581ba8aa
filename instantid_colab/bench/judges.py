"""The identity benchmark's judges: the models that score a picture and never make one.

- Likeness by face recognisers that did not condition the picture. Scoring with the network that conditions it
  (antelopev2's glintr100, for InstantID and PuLID) flatters the method; PuLID's tables use CurricularFace for that
  reason. The main judge is AuraFace (fal/AuraFace-v1: an ArcFace-class ResNet-100 trained on openly licensed data,
  Apache-2.0, LFW 99.65 %, CPLFW 90.93 %), of which only the recogniser `glintr100.onnx` is fetched (the repo's
  detection and landmark files are insightface's, non-commercial): it runs on onnxruntime through insightface's
  ArcFaceONNX, which aligns the face on its five points. The light judge is SFace (opencv/face_recognition_sface:
  Apache-2.0, 99.40 % on LFW, 37 MB), through OpenCV's own `FaceRecognizerSF`. The face itself is found by the
  detector already loaded (antelopev2's SCRFD): the judges only recognise.
- Prompt-following as CLIP score (CLIP-T): CLIP's image-text cosine with openai/clip-vit-large-patch14, the
  model torchmetrics' CLIPScore defaults to, reported as 100 x max(cosine, 0) as torchmetrics and the papers'
  tables do (UniPortrait's InstantID: 24.1). Prompts longer than CLIP's 77 tokens are cut there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from instantid_colab.components import load as load_component, pil_image_processor
from instantid_colab.faces import Face, reference_direction
from instantid_colab.images import ImageLike, open_image
from instantid_colab.weights import WeightPaths, ensure_judge, reading

AURAFACE_REPO = "fal/AuraFace-v1"
AURAFACE_FILE = "glintr100.onnx"  # the recogniser alone: the repo's other files are insightface's detectors
SFACE_REPO = "opencv/face_recognition_sface"
SFACE_FILE = "face_recognition_sface_2021dec.onnx"
CLIP_REPO = "openai/clip-vit-large-patch14"
CLIP_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json", "vocab.json",
              "merges.txt", "special_tokens_map.json")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two identities, each one embedding or the mean direction of several."""
    return round(float(np.dot(reference_direction(a), reference_direction(b))), 4)


@contextlib.contextmanager
def _opencv_quiet(cv2):
    """OpenCV 5 warns, loading any ONNX model, that its new graph engine ignores the target it sets itself: only
    errors while the model loads (OpenCV before 4.6 has no log level to set, and no such warning)."""
    logging = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging is None:
        yield
        return
    level = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        logging.setLogLevel(level)


def angle(a: np.ndarray, b: np.ndarray) -> float:
    """The angle between two identities (radians), as the copy-paste measure compares them."""
    return float(np.arccos(np.clip(np.dot(reference_direction(a), reference_direction(b)), -1.0, 1.0)))


def copy_paste(picture: np.ndarray, given: np.ndarray, held_out: np.ndarray, floor: float = 1e-6) -> float:
    """MultiID-Bench's copy-paste measure (WithAnyone, ICLR 2026): (angle(picture, held-out) - angle(picture,
    given)) / angle(given, held-out). 1: the picture sits on the photos given (a copy); -1: on the held-out photo;
    0: as far from both. Pasting the reference face scores as likeness unless this is measured."""
    return round((angle(picture, held_out) - angle(picture, given)) / max(angle(given, held_out), floor), 4)


class AuraFaceJudge:
    """AuraFace embeddings of faces found by our detector (insightface's ArcFaceONNX: five-point alignment to
    112 px, then the ONNX recogniser on onnxruntime)."""

    name = f"AuraFace ({AURAFACE_REPO})"

    def __init__(self, path, on_gpu: bool):
        from insightface.model_zoo import model_zoo

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if on_gpu else ["CPUExecutionProvider"]
        with reading("the AuraFace face recogniser", path):
            self._model = model_zoo.get_model(str(path), providers=providers)
        if self._model is None or getattr(self._model, "taskname", None) != "recognition":
            raise ValueError(f"{path}: insightface does not read it as a face recogniser; download {AURAFACE_REPO} "
                             f"{AURAFACE_FILE} again (download --force {path}).")
        self._model.prepare(ctx_id=0 if on_gpu else -1)

    def embed(self, image: ImageLike, face: Face) -> np.ndarray:
        """The 512-d AuraFace embedding of `face` (box and five points in `image`'s pixels)."""
        bgr = np.ascontiguousarray(np.asarray(open_image(image, "picture", max_side=None))[:, :, ::-1])
        return np.asarray(self._model.get(bgr, face.copy()), dtype=np.float32).reshape(-1)  # get() writes on the face


class FaceJudge:
    """SFace embeddings of faces found by our detector (OpenCV's FaceRecognizerSF: its alignment, its model)."""

    name = f"SFace ({SFACE_REPO})"

    def __init__(self, path):
        import cv2

        with _opencv_quiet(cv2), reading("the SFace face recogniser", path):
            self._recognizer = cv2.FaceRecognizerSF.create(str(path), "")

    def embed(self, image: ImageLike, face: Face) -> np.ndarray:
        """The 128-d SFace embedding of `face` (box and five points in `image`'s pixels)."""
        bgr = np.ascontiguousarray(np.asarray(open_image(image, "picture", max_side=None))[:, :, ::-1])
        x1, y1, x2, y2 = np.asarray(face.bbox, dtype=np.float32)[:4]
        # FaceRecognizerSF takes a face as YuNet writes it: x, y, w, h, the five points (SCRFD's order), score.
        row = np.concatenate([[x1, y1, x2 - x1, y2 - y1], np.asarray(face.kps, np.float32).reshape(-1), [face.det_score]])
        aligned = self._recognizer.alignCrop(bgr, row.astype(np.float32)[None])
        return np.asarray(self._recognizer.feature(aligned), dtype=np.float32).reshape(-1)


class ClipJudge:
    """CLIP score of a picture against its prompt: 100 x max(cos(image, text), 0)."""

    name = f"CLIP ({CLIP_REPO})"

    def __init__(self, folder, device: str, dtype: torch.dtype):
        from transformers import CLIPModel, CLIPTokenizer

        self.model = load_component(CLIPModel, folder, device, dtype).eval()
        with reading("the CLIP tokenizer and image processor", folder):
            self.tokenizer = CLIPTokenizer.from_pretrained(folder)
            self.processor = pil_image_processor("CLIPImageProcessor").from_pretrained(folder)
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def score(self, image: ImageLike, prompt: str) -> float:
        pixels = self.processor(images=open_image(image, "picture"), return_tensors="pt")["pixel_values"]
        text = self.tokenizer([prompt], padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                              return_tensors="pt")
        output = self.model(input_ids=text["input_ids"].to(self.device),
                            attention_mask=text["attention_mask"].to(self.device),
                            pixel_values=pixels.to(self.device, self.dtype))
        cosine_similarity = float((output.image_embeds.float() * output.text_embeds.float()).sum())
        return round(100 * max(cosine_similarity, 0.0), 3)


@dataclass
class Judges:
    auraface: AuraFaceJudge
    sface: FaceJudge
    clip: ClipJudge

    def faces(self) -> dict[str, AuraFaceJudge | FaceJudge]:
        return {"auraface": self.auraface, "sface": self.sface}


NAMES = {"auraface": AuraFaceJudge.name, "sface": FaceJudge.name, "clip": ClipJudge.name}  # as reports name them


def load_judges(weights: WeightPaths, device: Any, on_gpu: bool) -> Judges:
    """The three judges, fetched the first time (AuraFace 261 MB, CLIP-L 1.7 GB, SFace 37 MB). CLIP runs beside the
    pipeline in fp16 when the memory plan keeps everything on the GPU (0.9 GB more on a T4), else on the CPU in
    float32; AuraFace on the GPU's onnxruntime then too."""
    auraface = ensure_judge(weights, AURAFACE_REPO, (AURAFACE_FILE,)) / AURAFACE_FILE
    sface = ensure_judge(weights, SFACE_REPO, (SFACE_FILE,)) / SFACE_FILE
    clip = ensure_judge(weights, CLIP_REPO, CLIP_FILES)
    device, dtype = (str(device), torch.float16) if on_gpu else ("cpu", torch.float32)
    return Judges(AuraFaceJudge(auraface, on_gpu), FaceJudge(sface), ClipJudge(clip, device, dtype))
