"""The identity benchmark's judges: the models that score a picture and never make one.

- Likeness by a second face recogniser, SFace (opencv/face_recognition_sface: Apache-2.0, 99.40 % on LFW),
  through OpenCV's own `FaceRecognizerSF`, which aligns the face on its five points and embeds it. Scoring
  with the network that conditions the picture flatters the method (PuLID's tables use CurricularFace for that
  reason); SFace shares nothing with antelopev2's glintr100. It is openly licensed (insightface's models are
  not), maintained in OpenCV's model zoo and run by OpenCV, which every install already has (no new package;
  OpenCV 4.5.4 to 5), and small (37 MB, milliseconds a face on a CPU). The face itself is found by the
  detector already loaded (antelopev2's SCRFD): the judge only recognises.
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
    face: FaceJudge
    clip: ClipJudge


NAMES = {"judge": FaceJudge.name, "clip": ClipJudge.name}  # as the table, the CSV and the plot name them


def load_judges(weights: WeightPaths, device: Any, on_gpu: bool) -> Judges:
    """Both judges, fetched the first time (CLIP-L 1.7 GB, SFace 37 MB). CLIP runs beside the pipeline in fp16
    when the memory plan keeps everything on the GPU (0.9 GB more on a T4), else on the CPU in float32."""
    sface = ensure_judge(weights, SFACE_REPO, (SFACE_FILE,)) / SFACE_FILE
    clip = ensure_judge(weights, CLIP_REPO, CLIP_FILES)
    device, dtype = (str(device), torch.float16) if on_gpu else ("cpu", torch.float32)
    return Judges(FaceJudge(sface), ClipJudge(clip, device, dtype))
