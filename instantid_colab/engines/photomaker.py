"""PhotoMaker V2 (TencentARC/PhotoMaker, SDXL) on the UNet InstantID already loaded.

The method, as `photomaker/pipeline.py` and `model_v2.py` run it: the prompt names the person with a class word and
the trigger word ("a man img"); the trigger is taken out and the class word's token repeated twice per ID photo.
Each photo gives insightface buffalo_l's (unnormalised) face embedding and CLIP ViT-L/14's last hidden states of
the whole photo; a Q-Former perceiver turns them into two tokens per photo, and a fuse MLP merges each into one
copy of the class word's text embedding: the photos are stacked into one identity inside the prompt. The first
`start_merge_step` + 1 steps see the prompt without the trigger (the style forms), the rest the fused prompt
(the identity joins); the adapter strength is 1 - the official "style strength" (0.8: its default 20 %). The
file's LoRA is on for this method's calls only. No ControlNet of its own, so extra ControlNets and style LoRAs work
as the official ControlNet pipeline and its LoRA example allow.

diffusers has the Q-Former perceiver (`IPAdapterFaceIDPlusImageProjection`: the same token projection, perceiver
and residual) and loads the LoRA; transformers has the CLIP vision tower. The fuse MLP and the trigger-word
tokenisation are written here because no library has them. What differs from the official code, each measured or
said where it is done: faces are found by our detector (its largest face; the official takes its detector's first),
and a photo without a face is refused (the official would pass its pixels without an embedding and fail).
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from instantid_colab import library_messages
from instantid_colab.adapter import AdapterError, _compare, problem_lines
from instantid_colab.components import parameter_device, parameter_dtype
from instantid_colab.engines.common import (
    Conditioning, EngineCall, layers_for_the_call, load_recogniser, perceiver_layers_to_diffusers, read_two_groups,
    unet_processors,
)
from instantid_colab.settings import SettingsError

NAME = "photomaker-v2"
ADAPTER_REPO, ADAPTER_FILE = "TencentARC/PhotoMaker-V2", "photomaker-v2.bin"
RECOGNISER_REPO, RECOGNISER_FILE = "public-data/insightface", "models/buffalo_l/w600k_r50.onnx"  # as FaceID's
ID_ENCODER, LORA = "id_encoder", "lora_weights"  # the file's two groups
LORA_ADAPTER = "photomaker"  # the official adapter name
TRIGGER_WORD = "img"  # the official default
NUM_TOKENS = 2  # ID tokens per photo (model_v2's num_tokens)
ID_DIM, DIM_HEAD = 512, 128  # buffalo_l's embedding; the perceiver's head width (heads = width // 128)
MERGE_CAP = 30  # the official app: start_merge_step at most 30
VISION_HEADS_WIDTH = 64  # CLIP ViT-L/14: 16 heads of 64 (heads cannot be read from the shapes)
_LOADER_LOGGERS = ["diffusers.loaders.lora_pipeline", "diffusers.loaders.lora_base", "diffusers.loaders.peft",
                   "diffusers.models.modeling_utils"]
_ANSWERED = ("No LoRA keys associated to",)  # the file's LoRA has no text-encoder part


@dataclass(frozen=True)
class PhotoMakerFiles:
    adapter: Path
    recogniser: Path


def ensure_files(weights, *, downloader=None, progress: bool = True, offline: bool | None = None) -> PhotoMakerFiles:
    """The PhotoMaker V2 file and the buffalo_l recogniser (shared with FaceID), each fetched once."""
    from instantid_colab.weights import Source, _ensure, hub_downloader, model_folder

    downloader = downloader or hub_downloader
    folders = {repo: model_folder(weights, "identity", repo) for repo in (ADAPTER_REPO, RECOGNISER_REPO)}
    for repo, names, what in ((ADAPTER_REPO, (ADAPTER_FILE,), "The PhotoMaker V2 file"),
                              (RECOGNISER_REPO, (RECOGNISER_FILE,), "The buffalo_l face recogniser")):
        _ensure(Source(repo, names, folders[repo]), f"{what} {repo}", downloader, progress, offline)
    return PhotoMakerFiles(adapter=folders[ADAPTER_REPO] / ADAPTER_FILE,
                           recogniser=folders[RECOGNISER_REPO] / RECOGNISER_FILE)


class _MLP(nn.Module):
    """model_v2's MLP: layer norm, two linears around a GELU, optionally residual."""

    def __init__(self, width_in: int, width_out: int, hidden: int, residual: bool):
        super().__init__()
        self.layernorm, self.residual = nn.LayerNorm(width_in), residual
        self.fc1, self.fc2, self.act_fn = nn.Linear(width_in, hidden), nn.Linear(hidden, width_out), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return out + x if self.residual else out


class FuseModule(nn.Module):
    """model_v2's FuseModule: each ID token merged into one copy of the class word's text embedding."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp1 = _MLP(2 * width, width, width, residual=False)
        self.mlp2 = _MLP(width, width, width, residual=True)
        self.layer_norm = nn.LayerNorm(width)

    def forward(self, prompt_embeds: torch.Tensor, id_tokens: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
        """prompt_embeds [1, seq, width], id_tokens [photos x tokens, width] in photo order, class_mask [seq] with
        as many positions as tokens -> the prompt embeddings with those positions fused."""
        words = prompt_embeds[0, class_mask]
        fused = self.mlp2(self.mlp1(torch.cat([words, id_tokens.to(words.dtype)], dim=-1)) + words)
        out = prompt_embeds.clone()
        out[0, class_mask] = self.layer_norm(fused).to(out.dtype)
        return out


def _id_encoder_class():
    from transformers import CLIPVisionModelWithProjection

    class PhotoMakerIDEncoder(CLIPVisionModelWithProjection):
        """model_v2's PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken: the CLIP vision tower (transformers), the
        Q-Former perceiver (diffusers' FaceID Plus projection, shortcut scale 1), the fuse MLP, and
        `visual_projection_2`, in the file though V2 never uses it (loaded so that the file loads strictly)."""

        def __init__(self, vision_config, width: int, num_tokens: int, heads: int, depth: int, projection_2: int):
            from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

            super().__init__(vision_config)
            self.fuse_module = FuseModule(width)
            self.visual_projection_2 = nn.Linear(vision_config.hidden_size, projection_2, bias=False)
            self.qformer_perceiver = IPAdapterFaceIDPlusImageProjection(
                embed_dims=width, output_dims=width, hidden_dims=vision_config.hidden_size, id_embeddings_dim=ID_DIM,
                depth=depth, dim_head=width // heads, heads=heads, num_tokens=num_tokens, ffn_ratio=4, ffproj_ratio=4)

        def id_tokens(self, pixels: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
            """[photos, tokens, width] for pixels [photos, 3, side, side] and id_embeds [photos, 512]."""
            perceiver = self.qformer_perceiver
            perceiver.clip_embeds = self.vision_model(pixels)[0][:, None]  # last hidden states, before the norm
            perceiver.shortcut, perceiver.shortcut_scale = True, 1.0
            try:
                return perceiver(id_embeds)
            finally:
                perceiver.clip_embeds = None

    return PhotoMakerIDEncoder


_RENAMES = (("qformer_perceiver.token_proj.0.", "qformer_perceiver.proj.net.0.proj."),
            ("qformer_perceiver.token_proj.2.", "qformer_perceiver.proj.net.2."),
            ("qformer_perceiver.token_norm.", "qformer_perceiver.norm."),
            ("qformer_perceiver.perceiver_resampler.", "qformer_perceiver."))


def id_encoder_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's id_encoder keys -> ours (timm style, one filter): the Q-Former as diffusers' FaceID Plus
    projection names it; the CLIP tower and fuse MLP keep the official names."""
    renamed = {}
    for key, value in tensors.items():
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    return perceiver_layers_to_diffusers(renamed, prefix="qformer_perceiver.")


def config_of(tensors: dict[str, torch.Tensor]) -> dict:
    """The ID encoder's hyper-parameters from the file's shapes (ViT-L/14 and SDXL's where a tensor is missing, so
    that the shape check names it)."""
    def shape(key: str, default: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(tensors[key].shape) if key in tensors else default

    hidden = shape("vision_model.embeddings.class_embedding", (1024,))[0]
    patch = shape("vision_model.embeddings.patch_embedding.weight", (hidden, 3, 14, 14))[-1]
    positions = shape("vision_model.embeddings.position_embedding.weight", (257, hidden))[0]
    layers = {int(found.group(1)) for key in tensors
              if (found := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", key))}
    width = shape("fuse_module.layer_norm.weight", (2048,))[0]
    inner = shape("qformer_perceiver.perceiver_resampler.layers.0.0.to_q.weight", (width, width))[0]
    return {"vision": dict(hidden_size=hidden, patch_size=patch, image_size=patch * round((positions - 1) ** 0.5),
                           num_hidden_layers=len(layers) or 24, num_attention_heads=max(hidden // VISION_HEADS_WIDTH, 1),
                           intermediate_size=shape("vision_model.encoder.layers.0.mlp.fc1.weight", (4 * hidden,))[0],
                           projection_dim=shape("visual_projection.weight", (768, hidden))[0]),
            "width": width, "heads": max(inner // DIM_HEAD, 1),
            "projection_2": shape("visual_projection_2.weight", (1280, hidden))[0],
            "num_tokens": shape("qformer_perceiver.token_proj.2.weight", (NUM_TOKENS * width,))[0] // width,
            "depth": len({key.split(".")[3] for key in tensors
                          if key.startswith("qformer_perceiver.perceiver_resampler.layers.")}) or 4}


def read_groups(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """`{"id_encoder": ..., "lora_weights": ...}` from the official pickle (weights_only) or a safetensors copy."""
    return read_two_groups(path, (ID_ENCODER, LORA), f"{ADAPTER_REPO} {ADAPTER_FILE}")


def check_fits(groups: dict, encoder: nn.Module, pipe, source: str) -> dict[str, torch.Tensor]:
    """The LoRA as diffusers reads it, or AdapterError naming every missing, unexpected or misshapen key of the ID
    encoder, a width that is not this UNet's text width, and LoRA layers this UNet does not have."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    from instantid_colab.loras import fit_problems

    expected = {key: tuple(value.shape) for key, value in encoder.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in id_encoder_state_dict(groups.get(ID_ENCODER, {})).items()}
    problems = [f"{ID_ENCODER}.{line}" for line in _compare(expected, found)]
    width = pipe.unet.config.cross_attention_dim
    if encoder.fuse_module.layer_norm.weight.shape[0] != width:
        problems.append(f"{ID_ENCODER} fuses {encoder.fuse_module.layer_norm.weight.shape[0]}-wide text embeddings; "
                        f"this SDXL's are {width} wide")
    with library_messages.without(_LOADER_LOGGERS, _ANSWERED):
        lora, _ = pipe.lora_state_dict(dict(groups.get(LORA, {})))
    on_unet = {key.removeprefix("unet."): value for key, value in lora.items() if key.startswith("unet.")}
    problems += [f"{LORA}.{key}: not a UNet layer (PhotoMaker's LoRA is on the UNet only)" for key in lora
                 if not key.startswith("unet.")]
    as_peft = {f"unet.{key}": value for key, value in convert_unet_state_dict_to_peft(on_unet).items()}
    problems += [f"{LORA}: {line}" for line in fit_problems(pipe, as_peft)]
    if problems:
        raise AdapterError(f"{source}: does not fit this SDXL as a PhotoMaker V2 file.\n{problem_lines(problems)}\n"
                           f"Next step: use {ADAPTER_REPO} {ADAPTER_FILE} (the SDXL V2 file, not V1's); "
                           "`download --force FILE` fetches a damaged one again.")
    return lora


def trigger_tokens(tokenizer, prompt: str, photos: int, trigger: str = TRIGGER_WORD) -> tuple[list[int], list[bool]]:
    """The prompt's token ids for one text encoder with the trigger word taken out and the class word before it
    repeated `photos` x NUM_TOKENS times (truncated or padded to the tokenizer's length), and where those copies
    are: `encode_prompt_with_trigger_word`. `tokenizer` knows the trigger as a token of its own."""
    trigger_id = tokenizer.convert_tokens_to_ids(trigger)
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    clean = [token for token in ids if token != trigger_id]
    places = [index - 1 - ids[:index].count(trigger_id) for index, token in enumerate(ids) if token == trigger_id]
    if len(places) != 1:
        raise SettingsError([f"identity {NAME} needs its trigger word '{trigger}' once in the first 77 tokens of the "
                             f"prompt, right after the class word (\"a man {trigger}\"); found {len(places)}"])
    place, count = places[0], photos * NUM_TOKENS
    clean = (clean[:place] + [clean[place]] * count + clean[place + 1:])[:tokenizer.model_max_length]
    clean += [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(clean))
    if place + count > len(clean):
        raise SettingsError([f"identity {NAME}: the class word before '{trigger}' is too near the end of the prompt "
                             f"for {photos} photos ({count} copies of it past token {len(clean)}); move it earlier or "
                             "give fewer photos"])
    return clean, [place <= index < place + count for index in range(len(clean))]


def text_only(tokenizer, prompt: str, trigger: str = TRIGGER_WORD) -> str:
    """The prompt without the trigger word, as the official pipeline makes it (its tokens decoded back to text)."""
    trigger_id = tokenizer.convert_tokens_to_ids(trigger)
    tokens = tokenizer.encode(prompt, add_special_tokens=False)
    tokens.remove(trigger_id)
    return tokenizer.decode(tokens, add_special_tokens=False)


def start_merge_step(adapter_strength: float, steps: int) -> int:
    """The official app's `int(style_strength_ratio / 100 * num_steps)`, at most 30, with the style strength ratio
    100 x (1 - adapter strength) (rounded so that 0.8 gives its 20 exactly)."""
    return min(int(round(100 * (1 - adapter_strength), 6) / 100 * steps), MERGE_CAP)


@dataclass
class PhotoMakerEngine:
    """PhotoMaker V2's own modules, loaded once beside InstantID's: the ID encoder (on the CPU between calls), the
    trigger-aware tokenizers, the recogniser; its LoRA is inside the UNet as adapter `photomaker`."""

    id_encoder: nn.Module
    tokenizers: tuple  # copies of the pipeline's two tokenizers that know the trigger word
    image_processor: object
    recogniser: object  # insightface's ArcFaceONNX on buffalo_l's w600k_r50
    files: PhotoMakerFiles
    plain_attention: object  # diffusers' AttnProcessor2_0, on every attention layer during its calls

    lora_adapters = {LORA_ADAPTER: 1.0}
    photo_side = None  # whole photos, as the official app hands them to CLIP's processor (which makes them 224 px)

    def describe(self, values: dict) -> dict:
        return {"style_strength_ratio": round(100 * (1 - values["adapter_strength"]), 6),
                "start_merge_step": start_merge_step(values["adapter_strength"], values["steps"]),
                "trigger_word": TRIGGER_WORD, "model_files": [f"{ADAPTER_REPO}/{ADAPTER_FILE}",
                                                              f"{RECOGNISER_REPO}/{RECOGNISER_FILE}"]}

    def where(self) -> str:
        parameters = list(self.id_encoder.parameters())
        size = sum(p.numel() * p.element_size() for p in parameters) / 2**30
        return (f"{NAME}: ID encoder (CLIP ViT-L/14, Q-Former, fuse) on {parameters[0].device.type} ({size:.2f} GiB, "
                "on the GPU only for its one encode per picture); its LoRA inside the UNet")

    def to(self, device: str) -> None:
        """Nothing waits off the UNet between calls but the ID encoder, which stays on the CPU."""

    def release(self, pipe) -> None:
        """Take the file's LoRA off the UNet; the rest goes with this engine."""
        pipe.delete_adapters(LORA_ADAPTER)

    def id_embeds(self, analyzer, photos: list) -> torch.Tensor:
        """[photos, 512]: buffalo_l's unnormalised embedding of each photo's face (the official `face['embedding']`)."""
        embeddings = []
        for photo in photos:
            face = analyzer.detect(photo)
            bgr = np.ascontiguousarray(np.asarray(photo.convert("RGB"))[:, :, ::-1])  # insightface reads BGR
            embeddings.append(torch.from_numpy(np.asarray(self.recogniser.get(bgr, face), dtype=np.float32)))
        return torch.stack(embeddings)

    def trigger_embeddings(self, pipe, prompt: str, photos: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt embeds [1, seq, width], pooled [1, pooled width], class-word mask [seq]) for the prompt with the
        class word repeated per ID token; each text encoder runs where it is (a hook moves it to `device`)."""
        states, mask, pooled = [], None, None
        for tokenizer, encoder in zip(self.tokenizers, (pipe.text_encoder, pipe.text_encoder_2)):
            ids, mask = trigger_tokens(tokenizer, prompt, photos)
            on = parameter_device(encoder) if not hasattr(encoder, "_hf_hook") else device
            with torch.no_grad():
                output = encoder(torch.tensor([ids], device=on), output_hidden_states=True)
            pooled = output[0]
            states.append(output.hidden_states[-2])
        return torch.cat(states, dim=-1), pooled, torch.tensor(mask)

    def identity_prompt(self, pipe, analyzer, photos: list, prompt: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt embeds [1, seq, width] with the photos' identity fused into the class word, pooled [1, width]):
        the official `id_encoder(id_pixel_values, prompt_embeds, class_tokens_mask, id_embeds)`. The ID encoder
        visits `device` for this only."""
        ids = self.id_embeds(analyzer, photos)
        pixels = self.image_processor(images=[photo.convert("RGB") for photo in photos], return_tensors="pt").pixel_values
        prompt_embeds, pooled, mask = self.trigger_embeddings(pipe, prompt, len(photos), device)
        encoder, home = self.id_encoder, parameter_device(self.id_encoder)
        encoder.to(device)
        try:
            with torch.no_grad():
                dtype = parameter_dtype(encoder)
                tokens = encoder.id_tokens(pixels.to(device, dtype), ids.to(device, dtype))
                fused = encoder.fuse_module(prompt_embeds.to(device, dtype), tokens.reshape(-1, tokens.shape[-1]),
                                            mask.to(device))
        finally:
            encoder.to(home)
        return fused, pooled.to(device)

    def conditioning(self, call: EngineCall) -> Conditioning:
        """The prompt without the trigger word for the first steps, then with the identity fused into it."""
        values, num = call.values, call.num
        fused, pooled = self.identity_prompt(call.pipe, call.analyzer, call.photos, call.prompt, call.device)
        text = call.encode(text_only(self.tokenizers[0], call.prompt), call.negative_prompt)
        merge = start_merge_step(values["adapter_strength"], values["steps"])
        identity = {"prompt_embeds": fused.to(call.device, call.dtype).repeat(num, 1, 1),
                    "add_text_embeds": pooled.to(call.device, call.dtype).repeat(num, 1)}
        if call.do_cfg:
            identity = {"prompt_embeds": torch.cat([text["negative_prompt_embeds"].repeat(num, 1, 1),
                                                    identity["prompt_embeds"]]),
                        "add_text_embeds": torch.cat([text["negative_pooled_prompt_embeds"].repeat(num, 1),
                                                      identity["add_text_embeds"]])}

        def after_step(step: int, tensors: dict) -> dict:
            if step == merge:  # the official `i <= start_merge_step`: from the next step on, the identity
                tensors.update(identity)
            return tensors

        return Conditioning({}, self.installed(call.pipe.unet), text=text, after_step=after_step,
                            tensor_inputs=("prompt_embeds", "add_text_embeds"))

    @contextlib.contextmanager
    def installed(self, unet) -> Iterator[None]:
        """diffusers' plain attention on every layer and InstantID's projection off for the call (PhotoMaker has no
        image tokens: InstantID's IP processors would read the prompt's last 16 tokens as face tokens); InstantID's
        back afterwards."""
        with layers_for_the_call(unet, {name: self.plain_attention for name in unet_processors(unet)}, None):
            yield


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load(pipe, files: PhotoMakerFiles, recogniser_device: str = "cpu") -> PhotoMakerEngine:
    """Read and check the file against `pipe` (key by key), build the ID encoder on the CPU in the UNet's dtype,
    load its LoRA into the UNet as adapter `photomaker` through diffusers."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPVisionConfig

    from instantid_colab.components import pil_image_processor
    from instantid_colab.weights import reading

    with reading("the PhotoMaker V2 file", files.adapter):
        groups = read_groups(files.adapter)
    config = config_of(groups.get(ID_ENCODER, {}))
    dtype = parameter_dtype(pipe.unet)
    with _default_dtype(dtype):  # built in the UNet's dtype: no float32 copy on the host
        encoder = _id_encoder_class()(CLIPVisionConfig(**config["vision"]), config["width"], config["num_tokens"],
                                      config["heads"], config["depth"], config["projection_2"])
    lora = check_fits(groups, encoder, pipe, str(files.adapter))
    encoder.load_state_dict(id_encoder_state_dict(groups[ID_ENCODER]))
    weights_device = next(pipe.unet.parameters()).device
    with library_messages.without(_LOADER_LOGGERS, _ANSWERED):
        pipe.load_lora_weights({key: value.to(weights_device, dtype) for key, value in lora.items()},
                               adapter_name=LORA_ADAPTER)
    tokenizers = tuple(copy.deepcopy(tokenizer) for tokenizer in (pipe.tokenizer, pipe.tokenizer_2))
    for tokenizer in tokenizers:
        tokenizer.add_tokens([TRIGGER_WORD], special_tokens=True)
    recogniser = load_recogniser(files.recogniser, recogniser_device, f"{RECOGNISER_REPO} {RECOGNISER_FILE}")
    return PhotoMakerEngine(id_encoder=encoder.eval(), tokenizers=tokenizers,
                            image_processor=pil_image_processor("CLIPImageProcessor")(), recogniser=recogniser,
                            files=files, plain_attention=AttnProcessor2_0())
