"""IP-Adapter FaceID Plus V2 for SDXL (h94/IP-Adapter-FaceID) on the UNet InstantID already loaded.

The method, as the model card and h94's `ip_adapter_faceid.py` (`IPAdapterFaceIDPlusXL`) run it: the face ID
embedding of insightface's buffalo_l recogniser (not antelopev2's) and the penultimate CLIP ViT-H/14 hidden states of
the face aligned to 224 px go through a projection (ID -> 4 tokens, refined by a perceiver over the CLIP states,
added back with weight `s_scale`: "V2"), and the tokens are attended to by IP processors in every cross-attention;
its file also holds a rank-128 LoRA on every attention layer, always on. No ControlNet.

diffusers loads all of it (`load_ip_adapter`: FaceID Plus projection, IP processors, the file's LoRA as adapter
`faceid_0`). This module adds what diffusers does not do: checking the file against the UNet before loading,
keeping the method's processors and projection beside InstantID's so one loaded SDXL switches between them, the
ID embedding from the buffalo_l recogniser, and the CLIP states computed once per call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from instantid_colab import library_messages
from instantid_colab.adapter import IMAGE_PROJ, IP_ADAPTER, AdapterError, _compare, problem_lines
from instantid_colab.components import parameter_dtype
from instantid_colab.engines.common import (
    Conditioning, EngineCall, attention_shapes, embedding_pair, layers_for_the_call, load_recogniser, per_image, read_two_groups,
    set_processors, tokens_for_the_call, unet_processors,
)
from instantid_colab.images import WORKING_SIDE

NAME = "faceid-plusv2"
ADAPTER_REPO, ADAPTER_FILE = "h94/IP-Adapter-FaceID", "ip-adapter-faceid-plusv2_sdxl.bin"
IMAGE_ENCODER_REPO = "h94/IP-Adapter"  # the card's image_encoder_path: laion's CLIP ViT-H/14, vision tower only
IMAGE_ENCODER_DIR = "models/image_encoder"
IMAGE_ENCODER_FILES = (f"{IMAGE_ENCODER_DIR}/config.json", f"{IMAGE_ENCODER_DIR}/model.safetensors")
RECOGNISER_REPO, RECOGNISER_FILE = "public-data/insightface", "models/buffalo_l/w600k_r50.onnx"  # a buffalo_l mirror
LORA_ADAPTER = "faceid_0"  # the name diffusers gives the file's LoRA
CROP_SIDE = 224  # the card's face_align.norm_crop(..., image_size=224)
ID_DIM, NUM_TOKENS, DIM_HEAD = 512, 4, 64  # ProjPlusModel's defaults, as IPAdapterFaceIDPlusXL builds it
_LOADER_LOGGERS = ["diffusers.loaders.ip_adapter", "diffusers.models.modeling_utils", "diffusers.loaders.lora_base",
                   "diffusers.loaders.lora_pipeline", "diffusers.loaders.peft"]
# Answered here: no image encoder in the pipeline (ours is called directly), diffusers' own cast, and the file's LoRA
# having no text-encoder part.
_ANSWERED = ("image_encoder is not loaded", "There are modules in UNet2DConditionModel that should be kept in float32",
             "No LoRA keys associated to")


@dataclass(frozen=True)
class FaceIDFiles:
    adapter: Path
    image_encoder: Path  # a folder with config.json and model.safetensors
    recogniser: Path


def ensure_files(weights, *, downloader=None, progress: bool = True, offline: bool | None = None) -> FaceIDFiles:
    """The three files FaceID Plus V2 adds to InstantID's, each fetched once under the weights folder."""
    from instantid_colab.weights import Source, _ensure, hub_downloader, model_folder

    downloader = downloader or hub_downloader
    folders = {repo: model_folder(weights, "identity", repo) for repo in (ADAPTER_REPO, IMAGE_ENCODER_REPO, RECOGNISER_REPO)}
    for repo, names, what in ((ADAPTER_REPO, (ADAPTER_FILE,), "The FaceID Plus V2 adapter"),
                              (IMAGE_ENCODER_REPO, IMAGE_ENCODER_FILES, "The FaceID image encoder (CLIP ViT-H/14)"),
                              (RECOGNISER_REPO, (RECOGNISER_FILE,), "The buffalo_l face recogniser")):
        _ensure(Source(repo, names, folders[repo]), f"{what} {repo}", downloader, progress, offline)
    return FaceIDFiles(adapter=folders[ADAPTER_REPO] / ADAPTER_FILE,
                       image_encoder=folders[IMAGE_ENCODER_REPO] / IMAGE_ENCODER_DIR,
                       recogniser=folders[RECOGNISER_REPO] / RECOGNISER_FILE)


def read_state_dict(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """`{"image_proj": ..., "ip_adapter": ...}` from the official pickle (weights_only) or a safetensors copy."""
    return read_two_groups(path, (IMAGE_PROJ, IP_ADAPTER), f"{ADAPTER_REPO} {ADAPTER_FILE}")


def expected_shapes(unet, clip_width: int, rank: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """Every key and shape of a FaceID Plus file for this UNet, a CLIP encoder `clip_width` wide and LoRA `rank`."""
    dim = unet.config.cross_attention_dim
    image_proj = {"proj.0.weight": (2 * ID_DIM, ID_DIM), "proj.0.bias": (2 * ID_DIM,),
                  "proj.2.weight": (dim * NUM_TOKENS, 2 * ID_DIM), "proj.2.bias": (dim * NUM_TOKENS,),
                  "norm.weight": (dim,), "norm.bias": (dim,)}
    resampler = {"proj_in.weight": (dim, clip_width), "proj_in.bias": (dim,), "proj_out.weight": (dim, dim),
                 "proj_out.bias": (dim,), "norm_out.weight": (dim,), "norm_out.bias": (dim,)}
    for layer in range(4):
        for norm in ("0.norm1", "0.norm2", "1.0"):
            resampler.update({f"layers.{layer}.{norm}.weight": (dim,), f"layers.{layer}.{norm}.bias": (dim,)})
        resampler.update({f"layers.{layer}.0.to_q.weight": (dim, dim), f"layers.{layer}.0.to_kv.weight": (2 * dim, dim),
                          f"layers.{layer}.0.to_out.weight": (dim, dim), f"layers.{layer}.1.1.weight": (4 * dim, dim),
                          f"layers.{layer}.1.3.weight": (dim, 4 * dim)})
    image_proj.update({f"perceiver_resampler.{key}": shape for key, shape in resampler.items()})
    ip_adapter = {}
    for index, (width, kv_width, cross) in enumerate(attention_shapes(unet)):
        for part, source in (("q", width), ("k", kv_width), ("v", kv_width), ("out", width)):
            ip_adapter[f"{index}.to_{part}_lora.down.weight"] = (rank, source)
            ip_adapter[f"{index}.to_{part}_lora.up.weight"] = (width, rank)
        if cross:
            ip_adapter[f"{index}.to_k_ip.weight"] = ip_adapter[f"{index}.to_v_ip.weight"] = (width, kv_width)
    return {IMAGE_PROJ: image_proj, IP_ADAPTER: ip_adapter}


def check_fits(state_dict: dict, unet, clip_width: int, source: str) -> None:
    """AdapterError naming every missing, unexpected or misshapen key when the file does not fit this UNet."""
    lora_down = state_dict[IP_ADAPTER].get("0.to_q_lora.down.weight")
    rank = lora_down.shape[0] if lora_down is not None else 128
    expected = expected_shapes(unet, clip_width, rank)
    problems = [f"{group}.{line}" for group in (IMAGE_PROJ, IP_ADAPTER)
                for line in _compare(expected[group], {k: tuple(v.shape) for k, v in state_dict[group].items()})]
    if problems:
        raise AdapterError(f"{source}: does not fit this SDXL UNet and image encoder as a FaceID Plus V2 adapter.\n"
                           f"{problem_lines(problems)}\nNext step: use {ADAPTER_REPO} {ADAPTER_FILE} (the SDXL file, "
                           f"not sd15) with {IMAGE_ENCODER_REPO} {IMAGE_ENCODER_DIR} (CLIP ViT-H/14); "
                           "`download --force FILE` fetches a damaged one again.")


@dataclass
class FaceIDEngine:
    """FaceID Plus V2's own modules, loaded once beside InstantID's on the same UNet."""

    processors: dict  # attention-layer name -> processor, as `unet.attn_processors` gives them
    projection: torch.nn.Module  # diffusers' MultiIPAdapterImageProjection holding IPAdapterFaceIDPlusImageProjection
    image_encoder: torch.nn.Module
    feature_extractor: object
    recogniser: object  # insightface's ArcFaceONNX on buffalo_l's w600k_r50
    files: FaceIDFiles

    lora_adapters = {LORA_ADAPTER: 1.0}  # the file's LoRA, on for this method's calls only
    photo_side = WORKING_SIDE  # its face photos, as every picture handed in

    @property
    def ip_processors(self) -> list:
        return [p for p in self.processors.values() if hasattr(p, "to_k_ip")]

    def to(self, device: str) -> None:
        """Move the layers that wait off the UNet (projection, IP layers) to `device` (an offload plan: the CPU).
        The LoRA is inside the UNet and goes where the plan puts the UNet."""
        self.projection.to(device)
        for processor in self.ip_processors:
            processor.to(device)

    def where(self) -> str:
        """Where this method's modules are, in numbers a person reads (the app's memory panel)."""
        layers = [*self.projection.parameters(), *(p for processor in self.ip_processors for p in processor.parameters())]
        encoder = list(self.image_encoder.parameters())

        def size(parameters) -> str:
            return f"{sum(p.numel() * p.element_size() for p in parameters) / 2**30:.2f} GiB"

        return (f"{NAME}: projection and IP layers on {layers[0].device.type} ({size(layers)}, its LoRA inside the "
                f"UNet); CLIP ViT-H image encoder on {encoder[0].device.type} ({size(encoder)}, on the GPU only for "
                "its one encode per picture)")

    def describe(self, values: dict) -> dict:
        return {"s_scale": values["s_scale"], "model_files": [f"{ADAPTER_REPO}/{ADAPTER_FILE}",
                                                    f"{IMAGE_ENCODER_REPO}/{IMAGE_ENCODER_DIR}",
                                                    f"{RECOGNISER_REPO}/{RECOGNISER_FILE}"]}

    def id_embedding(self, analyzer, photos: list, combine: str) -> np.ndarray:
        """buffalo_l's normed embedding of each photo's largest face (our detector's keypoints), combined as for
        InstantID's photos; the card's `faces[0].normed_embedding`."""
        from instantid_colab.faces import combine_embeddings

        embeddings = []
        for photo in photos:
            face = analyzer.detect(photo)
            bgr = np.ascontiguousarray(np.asarray(photo.convert("RGB"))[:, :, ::-1])  # insightface reads BGR
            feature = self.recogniser.get(bgr, face)
            embeddings.append(feature / np.linalg.norm(feature))
        return combine_embeddings(embeddings, combine)

    def face_crops(self, analyzer, photos: list) -> list[np.ndarray]:
        """Each photo's face aligned to 224 px by its five keypoints (the card's face_align.norm_crop), in RGB."""
        from insightface.utils import face_align

        return [face_align.norm_crop(np.asarray(photo.convert("RGB")), landmark=analyzer.detect(photo).kps,
                                     image_size=CROP_SIDE) for photo in photos]

    def clip_states(self, crops: list[np.ndarray], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[2, 1, 257, width]: the penultimate hidden states of the zero image (negative, as the official code) and
        of the crops (averaged over several photos). The encoder visits `device` only for this call."""
        pixels = self.feature_extractor(images=crops, return_tensors="pt").pixel_values
        encoder, home = self.image_encoder, next(self.image_encoder.parameters()).device
        encoder.to(device)
        try:
            with torch.no_grad():
                pixels = pixels.to(device, parameter_dtype(encoder))
                states = encoder(pixels, output_hidden_states=True).hidden_states[-2].mean(0, keepdim=True)
                empty = encoder(torch.zeros_like(pixels[:1]), output_hidden_states=True).hidden_states[-2]
        finally:
            encoder.to(home)
        return torch.cat([empty, states])[:, None].to(dtype)

    def tokens(self, id_embeds: torch.Tensor, clip_states: torch.Tensor, s_scale: float) -> torch.Tensor:
        """[batch, 4, cross_dim] for id embeds [batch, 1, 512] and CLIP states [batch, 1, 257, width], once per call
        (the UNet would recompute them at every step): diffusers' FaceID Plus projection with the V2 shortcut."""
        layer = self.projection.image_projection_layers[0]
        parameter = next(layer.parameters())
        layer.clip_embeds, layer.shortcut, layer.shortcut_scale = clip_states.to(parameter), True, s_scale
        try:
            with torch.no_grad():
                return self.projection([id_embeds.to(parameter)])[0][:, 0]
        finally:
            layer.clip_embeds = None

    def conditioning(self, call: EngineCall) -> Conditioning:
        """The pipeline call's arguments (the ID embeddings, negatives first) and the context that installs this
        method's processors and its 4 tokens per image, computed once, for the call."""
        values = call.values
        pair = embedding_pair(self.id_embedding(call.analyzer, call.photos, values["combine"]), (1, 1, ID_DIM),
                              values["negative_noise"], call.do_cfg, call.generator)
        states = self.clip_states(self.face_crops(call.analyzer, call.photos), call.device, call.dtype)
        tokens = self.tokens(per_image(pair, call.num), per_image(states if call.do_cfg else states[1:], call.num),
                             values["s_scale"]).to(call.device)
        for processor in self.ip_processors:
            processor.scale = [values["adapter_strength"]]
        return Conditioning({"ip_adapter_image_embeds": [pair.to(call.dtype)]},
                            self._conditioned(call.pipe.unet, tokens))

    @contextlib.contextmanager
    def _conditioned(self, unet, tokens: torch.Tensor) -> Iterator[None]:
        with self.installed(unet), tokens_for_the_call(unet, tokens):
            yield

    def release(self, pipe) -> None:
        """Take the file's LoRA off the UNet; the rest goes with this engine."""
        pipe.delete_adapters(LORA_ADAPTER)

    @contextlib.contextmanager
    def installed(self, unet) -> Iterator[None]:
        """This method's processors and projection on `unet` for one call; InstantID's afterwards."""
        with layers_for_the_call(unet, self.processors, self.projection):
            yield


def load(pipe, files: FaceIDFiles, recogniser_device: str = "cpu") -> FaceIDEngine:
    """Load the file through diffusers onto `pipe.unet` (checked first), keep its modules, give InstantID's back."""
    from transformers import CLIPVisionModelWithProjection

    from instantid_colab.components import load as load_component, pil_image_processor
    from instantid_colab.weights import reading

    unet = pipe.unet
    dtype = parameter_dtype(unet)
    with reading("the FaceID image encoder", files.image_encoder):
        image_encoder = load_component(CLIPVisionModelWithProjection, files.image_encoder, "cpu", dtype).eval()
    with reading("the FaceID adapter", files.adapter):
        state_dict = read_state_dict(files.adapter)
    check_fits(state_dict, unet, image_encoder.config.hidden_size, str(files.adapter))
    own_processors, own_projection = unet_processors(unet), unet.encoder_hid_proj
    weights_device = next(unet.parameters()).device
    state_dict = {group: {k: v.to(weights_device, dtype) for k, v in tensors.items()} for group, tensors in state_dict.items()}
    with library_messages.without(_LOADER_LOGGERS, _ANSWERED):
        pipe.load_ip_adapter(state_dict, subfolder="", weight_name="", image_encoder_folder=None)
    engine_processors, projection = unet_processors(unet), unet.encoder_hid_proj
    set_processors(unet, own_processors)
    unet.encoder_hid_proj = own_projection
    recogniser = load_recogniser(files.recogniser, recogniser_device, f"{RECOGNISER_REPO} {RECOGNISER_FILE}")
    return FaceIDEngine(processors=engine_processors, projection=projection, image_encoder=image_encoder,
                        feature_extractor=pil_image_processor("CLIPImageProcessor")(size=CROP_SIDE, crop_size=CROP_SIDE),
                        recogniser=recogniser, files=files)
