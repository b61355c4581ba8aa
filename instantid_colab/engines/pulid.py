"""PuLID for SDXL (ToTheBeginning/PuLID, the v1.1 pipeline) on the UNet InstantID already loaded.

The method, as `pulid/pipeline_v1_1.py` runs it: each face photo gives antelopev2's ID embedding (the recogniser
InstantID uses) and EVA02-CLIP-L's embedding and hidden states of the face aligned to 512 px, its background white
and the face in grey (face parsing); the IDFormer turns them into 32 ID tokens (a zero input gives the negative's),
and an ID attention beside every cross-attention adds attention to those tokens, orthogonalised ("ortho v2") and
padded with 20 zero tokens, the official app's settings, weighted by the ID scale. No ControlNet; no LoRA.

What differs from the official code, each for a reason said where it is done: the face is aligned on our detector's
keypoints (one face analysis for every method) rather than facexlib's RetinaFace, and parsed by a SegFormer trained
on the same CelebAMask-HQ labels (transformers; facexlib imports torchvision) with the background chosen by label
name; the method's layers run in the UNet's dtype; the picture is sampled by our schedulers, not PuLID's own
k-diffusion loops. The rest is restated and compared with the official code in tests/test_pulid.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from instantid_colab import eva_clip
from instantid_colab.adapter import AdapterError, _compare, problem_lines
from instantid_colab.components import parameter_dtype
from instantid_colab.engines.common import (
    Conditioning, EngineCall, attention_shapes, layers_for_the_call, perceiver_layers_to_diffusers, unet_processors,
)

NAME = "pulid"
ADAPTER_REPO, ADAPTER_FILE = "guozinan/PuLID", "pulid_v1.1.safetensors"
EVA_REPO, EVA_FILE = "QuanSun/EVA-CLIP", "EVA02_CLIP_L_336_psz14_s6B.pt"
PARSER_REPO, PARSER_FILES = "jonathandinu/face-parsing", ("config.json", "model.safetensors")
ID_FORMER, ID_LAYERS = "id_adapter", "id_adapter_attn_layers"  # the file's two groups, as the official attributes
ALIGNED_SIDE = 512
# facexlib's FaceRestoreHelper template for five keypoints at face_size 512, and its grey border (BGR).
TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                     [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float32)
BORDER_BGR = (135, 133, 132)
# PuLID's background labels [0, 16, 18, 7, 8, 9, 14, 15] of facexlib's BiSeNet, by their CelebAMask-HQ names.
BACKGROUND_PARTS = ("background", "cloth", "hat", "l_ear", "r_ear", "ear_r", "neck", "neck_l")
PARSER_MEAN, PARSER_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ID_DIM, DIM_HEAD, SCALES = 512, 64, 5  # antelopev2's embedding; IDFormer's head width and its five ViT scales
NUM_ZERO = 20  # the official app's "num zero": zero tokens after the ID tokens (likeness vs editability)
ID_PHOTO_SIDE = 1024  # app_v1_1.py: each ID photo resize_numpy_image_long(image, 1024) before get_id_embedding
ORTHO_TOKENS = 5  # ortho v2 weighs by the attention on the first five ID tokens


@dataclass(frozen=True)
class PuLIDFiles:
    adapter: Path
    eva: Path
    parser: Path  # a folder with config.json and model.safetensors


def ensure_files(weights, *, downloader=None, progress: bool = True, offline: bool | None = None) -> PuLIDFiles:
    """The three files PuLID adds to InstantID's, each fetched once under the weights folder."""
    from instantid_colab.weights import Source, _ensure, hub_downloader, model_folder

    downloader = downloader or hub_downloader
    folders = {repo: model_folder(weights, "identity", repo) for repo in (ADAPTER_REPO, EVA_REPO, PARSER_REPO)}
    for repo, names, what in ((ADAPTER_REPO, (ADAPTER_FILE,), "The PuLID v1.1 adapter"),
                              (EVA_REPO, (EVA_FILE,), "PuLID's face encoder (EVA02-CLIP-L-14-336)"),
                              (PARSER_REPO, PARSER_FILES, "The face parser (SegFormer, CelebAMask-HQ labels)")):
        _ensure(Source(repo, names, folders[repo]), f"{what} {repo}", downloader, progress, offline)
    return PuLIDFiles(adapter=folders[ADAPTER_REPO] / ADAPTER_FILE, eva=folders[EVA_REPO] / EVA_FILE,
                      parser=folders[PARSER_REPO])


def _mlp(width_in: int, width: int, width_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width_in, width), nn.LayerNorm(width), nn.LeakyReLU(), nn.Linear(width, width),
                         nn.LayerNorm(width), nn.LeakyReLU(), nn.Linear(width, width_out))


class IDFormer(nn.Module):
    """PuLID's ID encoder (`encoders_transformer.IDFormer`), written here because no library has it; its perceiver
    layers are diffusers' IP-Adapter Plus blocks (the same attention over [context, latents] and feed-forward)."""

    def __init__(self, dim: int, depth: int, heads: int, num_id_token: int, num_queries: int, output_dim: int,
                 ff_mult: int, vit_width: int, id_width: int, mapping_width: int):
        from diffusers.models.embeddings import IPAdapterPlusImageProjectionBlock

        super().__init__()
        self.dim, self.num_id_token, self.num_queries = dim, num_id_token, num_queries
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.proj_out = nn.Parameter(torch.zeros(dim, output_dim))
        self.layers = nn.ModuleList(IPAdapterPlusImageProjectionBlock(dim, DIM_HEAD, heads, ff_mult) for _ in range(depth))
        for scale in range(SCALES):
            setattr(self, f"mapping_{scale}", _mlp(vit_width, mapping_width, dim))
        self.id_embedding_mapping = _mlp(id_width, mapping_width, dim * num_id_token)

    def forward(self, id_cond: torch.Tensor, vit_hidden: list[torch.Tensor]) -> torch.Tensor:
        """[batch, photos, id_width] (or [batch, id_width]) and five [batch, tokens, vit_width] -> [batch, queries, out]."""
        photos = id_cond.shape[1] if id_cond.ndim == 3 else 1
        ids = self.id_embedding_mapping(id_cond).reshape(-1, self.num_id_token * photos, self.dim)
        latents = torch.cat([self.latents.repeat(len(ids), 1, 1), ids], dim=1)
        per_scale = len(self.layers) // SCALES
        for scale in range(SCALES):
            context = torch.cat([ids, getattr(self, f"mapping_{scale}")(vit_hidden[scale])], dim=1)
            for block in self.layers[scale * per_scale:(scale + 1) * per_scale]:
                latents = block(context, latents, latents)
        return latents[:, :self.num_queries] @ self.proj_out


def id_former_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's IDFormer keys -> ours (timm style, one filter): its perceiver layers as diffusers' blocks name them."""
    return perceiver_layers_to_diffusers(tensors)


def config_of(id_former: dict[str, torch.Tensor], output_dim: int, vit_width: int, eva_embed: int) -> dict[str, int]:
    """IDFormer's hyper-parameters read from the file's shapes (the official ones where a tensor is missing, so
    that the shape check names it)."""
    def shape(key: str, default: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(id_former[key].shape) if key in id_former else default

    dim = shape("proj_out", shape("latents", (1, 32, 1024))[-1:])[0]
    num_queries = shape("latents", (1, 32, dim))[1]
    mapping_width, found_vit_width = shape("mapping_0.0.weight", (1024, vit_width))
    return {"dim": dim, "num_queries": num_queries, "output_dim": output_dim,
            "depth": len({key.split(".")[1] for key in id_former if key.startswith("layers.")}) or 10,
            "heads": max(shape("layers.0.0.to_q.weight", (dim, dim))[0] // DIM_HEAD, 1),
            "ff_mult": shape("layers.0.1.1.weight", (4 * dim, dim))[0] // dim,
            "num_id_token": shape("id_embedding_mapping.6.weight", (5 * dim, mapping_width))[0] // dim,
            "vit_width": found_vit_width, "id_width": shape("id_embedding_mapping.0.weight", (0, ID_DIM + eva_embed))[1],
            "mapping_width": mapping_width}


def expected_shapes(config: dict[str, int], unet) -> dict[str, dict[str, tuple[int, ...]]]:
    """Every key and shape of a PuLID file for this IDFormer configuration and UNet, in the file's names."""
    dim, inner, hidden = config["dim"], config["heads"] * DIM_HEAD, config["ff_mult"] * config["dim"]
    former = {"latents": (1, config["num_queries"], dim), "proj_out": (dim, config["output_dim"])}
    for layer in range(config["depth"]):
        for norm in ("0.norm1", "0.norm2", "1.0"):
            former[f"layers.{layer}.{norm}.weight"] = former[f"layers.{layer}.{norm}.bias"] = (dim,)
        former.update({f"layers.{layer}.0.to_q.weight": (inner, dim), f"layers.{layer}.0.to_kv.weight": (2 * inner, dim),
                       f"layers.{layer}.0.to_out.weight": (dim, inner), f"layers.{layer}.1.1.weight": (hidden, dim),
                       f"layers.{layer}.1.3.weight": (dim, hidden)})
    width = config["mapping_width"]
    mappings = {f"mapping_{scale}": (config["vit_width"], dim) for scale in range(SCALES)}
    mappings["id_embedding_mapping"] = (config["id_width"], dim * config["num_id_token"])
    for name, (width_in, width_out) in mappings.items():
        for index, (rows, columns) in {0: (width, width_in), 3: (width, width), 6: (width_out, width)}.items():
            former[f"{name}.{index}.weight"], former[f"{name}.{index}.bias"] = (rows, columns), (rows,)
        for index in (1, 4):
            former[f"{name}.{index}.weight"] = former[f"{name}.{index}.bias"] = (width,)
    layers = {}
    for index, (width_q, kv_width, cross) in enumerate(attention_shapes(unet)):
        if cross:
            layers[f"{index}.id_to_k.weight"] = layers[f"{index}.id_to_v.weight"] = (width_q, kv_width)
    return {ID_FORMER: former, ID_LAYERS: layers}


def read_groups(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """`{"id_adapter": ..., "id_adapter_attn_layers": ...}` from the safetensors file (its keys' first part)."""
    from safetensors.torch import load_file

    groups: dict[str, dict[str, torch.Tensor]] = {ID_FORMER: {}, ID_LAYERS: {}}
    for key, value in load_file(str(path)).items():
        group, _, rest = key.partition(".")
        groups.setdefault(group, {})[rest] = value
    return groups


def check_fits(groups: dict, unet, eva_shape: dict[str, int], source: str) -> dict[str, int]:
    """IDFormer's configuration, or AdapterError naming every missing, unexpected or misshapen key."""
    config = config_of(groups[ID_FORMER], unet.config.cross_attention_dim, eva_shape["width"], eva_shape["embed_dim"])
    expected = expected_shapes(config, unet)
    problems = [f"unexpected group {group}" for group in groups if group not in expected]
    problems += [f"{group}.{line}" for group in expected
                 for line in _compare(expected[group], {k: tuple(v.shape) for k, v in groups.get(group, {}).items()})]
    if config["depth"] % SCALES:
        problems.append(f"{ID_FORMER}: {config['depth']} perceiver layers, not a multiple of {SCALES} (one group per "
                        "ViT scale)")
    if config["vit_width"] != eva_shape["width"] or config["id_width"] != ID_DIM + eva_shape["embed_dim"]:
        problems.append(f"{ID_FORMER} reads a ViT {config['vit_width']} wide and ID features {config['id_width']} wide; "
                        f"the EVA-CLIP file gives {eva_shape['width']} and {ID_DIM} + {eva_shape['embed_dim']}")
    if problems:
        raise AdapterError(f"{source}: does not fit this SDXL UNet and EVA-CLIP encoder as a PuLID adapter.\n"
                           f"{problem_lines(problems)}\nNext step: use {ADAPTER_REPO} {ADAPTER_FILE} (the SDXL v1.1 "
                           f"file, not the FLUX one) with {EVA_REPO} {EVA_FILE}; `download --force FILE` fetches a "
                           "damaged one again.")
    return config


class SelfAttnProcessor(nn.Module):
    """The self-attention layers' processor while PuLID runs: diffusers' own, taking (and ignoring) the ID
    arguments every layer is given, as the official AttnProcessor does."""

    def __init__(self):
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 id_embedding=None, id_scale=1.0):
        return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class IDAttnProcessor(nn.Module):
    """PuLID's IDAttnProcessor2_0 at the official app's settings (ortho v2, `num_zero` zero tokens): the layer's
    own cross-attention plus attention to the ID tokens, the part along the text's result taken out. Written here:
    no library has it."""

    def __init__(self, hidden_size: int, cross_attention_dim: int):
        super().__init__()
        self.id_to_k = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.id_to_v = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.num_zero = NUM_ZERO

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 id_embedding=None, id_scale=1.0):
        batch, length, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads

        def heads(tensor):
            return tensor.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query = heads(query)
        out = F.scaled_dot_product_attention(query, heads(key), heads(value))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if id_embedding is not None:
            tokens = torch.cat([id_embedding, id_embedding.new_zeros(batch, self.num_zero, id_embedding.shape[-1])], 1)
            id_key = heads(self.id_to_k(tokens).to(query.dtype))
            id_value = heads(self.id_to_v(tokens).to(query.dtype))
            id_out = F.scaled_dot_product_attention(query, id_key, id_value)
            id_out = id_out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
            on_id = (query @ id_key.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)[:, :, :ORTHO_TOKENS].sum(-1, keepdim=True)
            text, identity = out.float(), id_out.float()
            along = (text * identity).sum(dim=-2, keepdim=True) / (text * text).sum(dim=-2, keepdim=True) * text
            out = (text + id_scale * (identity + (on_id - 1) * along)).to(out.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@dataclass
class PuLIDEngine:
    """PuLID's own modules, loaded once beside InstantID's on the same UNet."""

    processors: dict  # attention-layer name -> processor (IDAttnProcessor on cross-attention), UNet order
    id_former: IDFormer
    eva: eva_clip.EVAVisionTower
    parser: nn.Module  # transformers' SegformerForSemanticSegmentation
    background: tuple[int, ...]  # the parser's label ids of BACKGROUND_PARTS
    files: PuLIDFiles
    lora_adapters = None  # PuLID has no LoRA
    photo_side = None  # its face photos are opened whole: `official_photo` shrinks them as the official app does

    @property
    def id_layers(self) -> list[IDAttnProcessor]:
        return [p for p in self.processors.values() if isinstance(p, IDAttnProcessor)]

    def to(self, device: str) -> None:
        """Move the ID attention layers (they wait off the UNet) to `device` (an offload plan: the CPU)."""
        for processor in self.id_layers:
            processor.to(device)

    def where(self) -> str:
        """Where this method's modules are, in numbers a person reads (the app's memory panel)."""
        def size(modules) -> str:
            return f"{sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 2**30:.2f} GiB"

        layers = self.id_layers
        return (f"{NAME}: ID attention layers on {next(layers[0].parameters()).device.type} ({size(layers)}); IDFormer, "
                f"EVA02-CLIP-L and face parser on {next(self.eva.parameters()).device.type} "
                f"({size([self.id_former, self.eva, self.parser])}, on the GPU only for their one encode per picture)")

    def describe(self, values: dict) -> dict:
        return {"id_scale": values["adapter_strength"], "num_zero": NUM_ZERO, "ortho": "v2",
                "model_files": [f"{ADAPTER_REPO}/{ADAPTER_FILE}", f"{EVA_REPO}/{EVA_FILE}", PARSER_REPO]}

    def face_features(self, face: np.ndarray) -> torch.Tensor:
        """[1, 3, side, side] for EVA-CLIP: the aligned face in grey on white where the parser sees no face
        (pipeline_v1_1's get_id_embedding), resized and normalised; runs where the parser is."""
        parameter = next(self.parser.parameters())
        pixels = torch.from_numpy(face).permute(2, 0, 1)[None].float().div(255).to(parameter.device)
        mean, std = (torch.tensor(v, device=pixels.device)[None, :, None, None] for v in (PARSER_MEAN, PARSER_STD))
        logits = self.parser(pixel_values=((pixels - mean) / std).to(parameter.dtype)).logits
        labels = F.interpolate(logits.float(), size=pixels.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        background = torch.isin(labels, torch.tensor(self.background, device=labels.device))[:, None]
        grey = (0.299 * pixels[:, 0:1] + 0.587 * pixels[:, 1:2] + 0.114 * pixels[:, 2:3]).repeat(1, 3, 1, 1)
        features = torch.where(background, torch.ones_like(pixels), grey)
        side = self.eva.image_size
        features = F.interpolate(features, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
        mean, std = (torch.tensor(v, device=pixels.device)[None, :, None, None] for v in (eva_clip.MEAN, eva_clip.STD))
        return (features - mean) / std

    def id_tokens(self, analyzer, photos: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(negative, positive) ID tokens [1, queries, cross_dim] for the photos (several: their tokens side by
        side, the official multi-image route); the encoders visit `device` only for this call."""
        modules = (self.id_former, self.eva, self.parser)
        home = next(self.eva.parameters()).device
        conditions, hidden = [], []
        for module in modules:
            module.to(device)
        try:
            with torch.no_grad():
                dtype = parameter_dtype(self.eva)
                for photo in map(official_photo, photos):
                    face = analyzer.detect(photo)
                    embedding = torch.as_tensor(np.asarray(face.embedding), dtype=torch.float32)
                    vit, states = self.eva(self.face_features(align_face(photo, face.kps)).to(dtype))
                    vit = vit / torch.norm(vit, 2, 1, True)
                    conditions.append(torch.cat([embedding[None].to(vit), vit], dim=-1))
                    hidden.append(states)
                states = [torch.cat(layer, dim=1) for layer in zip(*hidden)]
                positive = self.id_former(torch.stack(conditions, dim=1), states)
                negative = self.id_former(torch.zeros_like(conditions[0]), [torch.zeros_like(s) for s in hidden[0]])
        finally:
            for module in modules:
                module.to(home)
        return negative, positive

    def conditioning(self, call: EngineCall) -> Conditioning:
        """The pipeline call's arguments (the ID tokens per image, negatives first, through cross_attention_kwargs
        as the official inference passes them) and the context that installs the ID layers for the call."""
        negative, positive = self.id_tokens(call.analyzer, call.photos, call.device)
        tokens = torch.cat([*([negative] * call.num if call.do_cfg else []), *([positive] * call.num)])
        arguments = {"cross_attention_kwargs": {"id_embedding": tokens.to(call.device, call.dtype),
                                                "id_scale": call.values["adapter_strength"]}}
        return Conditioning(arguments, self.installed(call.pipe.unet))

    def release(self, pipe) -> None:
        """Nothing of it is on the UNet between calls: its modules go with this engine."""

    @contextlib.contextmanager
    def installed(self, unet) -> Iterator[None]:
        """This method's processors on `unet` for one call, InstantID's projection off; InstantID's afterwards,
        and the ID layers back where they waited (an offload hook moves them with the UNet)."""
        home = next(self.id_layers[0].parameters()).device
        try:
            with layers_for_the_call(unet, self.processors, None):
                yield
        finally:
            self.to(home)


def official_photo(photo):
    """An ID photo as the official app hands it to get_id_embedding: at most ID_PHOTO_SIDE on its long side, each
    side shrunk by the same factor and truncated, by OpenCV's Lanczos (pulid/utils.py resize_numpy_image_long). Its
    face is then detected, aligned and embedded at that size."""
    import cv2
    from PIL import Image

    width, height = photo.size
    if max(width, height) <= ID_PHOTO_SIDE:
        return photo
    factor = ID_PHOTO_SIDE / max(width, height)
    shrunk = cv2.resize(np.asarray(photo.convert("RGB")), (int(width * factor), int(height * factor)),
                        interpolation=cv2.INTER_LANCZOS4)
    return Image.fromarray(shrunk)


def align_face(photo, keypoints: np.ndarray) -> np.ndarray:
    """The face warped onto facexlib's 512 px template by its five keypoints (RGB), as FaceRestoreHelper's
    align_warp_face does on the BGR photo, grey border included."""
    import cv2

    matrix = cv2.estimateAffinePartial2D(np.asarray(keypoints, dtype=np.float32), TEMPLATE, method=cv2.LMEDS)[0]
    bgr = np.ascontiguousarray(np.asarray(photo.convert("RGB"))[:, :, ::-1])
    warped = cv2.warpAffine(bgr, matrix, (ALIGNED_SIDE, ALIGNED_SIDE), borderMode=cv2.BORDER_CONSTANT,
                            borderValue=BORDER_BGR)
    return np.ascontiguousarray(warped[:, :, ::-1])


def parser_background(config, source: str) -> tuple[int, ...]:
    """The parser's label ids of BACKGROUND_PARTS, by name (AdapterError naming what is missing)."""
    names = {str(name).removesuffix(".png"): int(index) for index, name in config.id2label.items()}
    missing = [part for part in BACKGROUND_PARTS if part not in names]
    if missing:
        raise AdapterError(f"{source}: the face parser has no labels {', '.join(missing)} (it names "
                           f"{', '.join(sorted(names))}); PuLID needs a parser with CelebAMask-HQ's labels: "
                           f"{PARSER_REPO}.")
    return tuple(names[part] for part in BACKGROUND_PARTS)


def load(pipe, files: PuLIDFiles, recogniser_device: str = "cpu") -> PuLIDEngine:
    """Read and check the three files against `pipe.unet`, build PuLID's modules beside InstantID's."""
    from transformers import SegformerForSemanticSegmentation

    from instantid_colab.components import load as load_component
    from instantid_colab.weights import reading

    unet = pipe.unet
    dtype, weights_device = parameter_dtype(unet), next(unet.parameters()).device
    with reading("PuLID's EVA-CLIP encoder", files.eva):
        visual = eva_clip.read(files.eva)
    try:
        eva_shape = eva_clip.shape_of(visual)
    except KeyError as error:
        raise AdapterError(f"{files.eva}: no EVA-CLIP vision tower in it (no visual.{error.args[0]}); download "
                           f"{EVA_REPO} {EVA_FILE} again (download --force {files.eva}).") from None
    eva = eva_clip.EVAVisionTower(**eva_shape).to(dtype)  # built in the UNet's dtype: no float32 copy on the host
    problems = _compare({k: tuple(v.shape) for k, v in eva.state_dict().items()},
                        {k: tuple(v.shape) for k, v in visual.items()})
    if problems:
        raise AdapterError(f"{files.eva}: not an EVA02-CLIP vision tower this code reads:\n"
                           f"{problem_lines(problems, prefix='visual.')}\nNext step: use {EVA_REPO} {EVA_FILE}.")
    eva.load_state_dict(visual)
    with reading("the PuLID adapter", files.adapter):
        groups = read_groups(files.adapter)
    config = check_fits(groups, unet, eva_shape, str(files.adapter))
    id_former = IDFormer(**config).to(dtype)
    id_former.load_state_dict(id_former_state_dict(groups[ID_FORMER]))
    processors = {}
    for index, name in enumerate(unet_processors(unet)):
        attention = unet.get_submodule(name.removesuffix(".processor"))
        if f"{index}.id_to_k.weight" in groups[ID_LAYERS]:
            layer = IDAttnProcessor(attention.to_q.in_features, attention.to_k.in_features)
            layer.load_state_dict({part: groups[ID_LAYERS][f"{index}.{part}"]
                                   for part in ("id_to_k.weight", "id_to_v.weight")})
            processors[name] = layer.to(weights_device, dtype)
        else:
            processors[name] = SelfAttnProcessor()
    parser = load_component(SegformerForSemanticSegmentation, files.parser, "cpu", dtype).eval()
    return PuLIDEngine(processors=processors, id_former=id_former.eval(), eva=eva.eval(),
                       parser=parser, background=parser_background(parser.config, str(files.parser)), files=files)
