"""PuLID v1.1 (`--identity pulid`) against ToTheBeginning/PuLID's code, restated, on the smoke SDXL.

Sources, ToTheBeginning/PuLID: `pulid/pipeline_v1_1.py` (`hack_unet_attn_layers`: every attn1 an AttnProcessor,
every other layer an IDAttnProcessor, loaded strictly from the file's groups; `get_id_embedding`: antelopev2's
embedding, the face aligned to 512 by facexlib, BiSeNet parsing with background labels [0, 16, 18, 7, 8, 9, 14, 15]
white and the face grey, torchvision's bicubic resize, EVA-CLIP's embedding normalised and its hidden states, the
IDFormer, the zero input as the negative; `__call__`/`inference`: the UNet run twice per step, positive and
negative each with its ID tokens through cross_attention_kwargs, mixed by the guidance scale),
`pulid/encoders_transformer.py` (IDFormer, PerceiverAttention), `pulid/attention_processor.py` (IDAttnProcessor2_0
with NUM_ZERO and ORTHO_v2, the official app's num_zero 20 and ortho v2), `eva_clip/eva_vit_model.py` and
`eva_clip/rope.py` (EVAVisionTransformer without xformers: rotary embedding, SwiGLU with sub-LayerNorm).
Shared by both sides, so not covered here: the face detection and antelopev2 embedding (insightface; facexlib's
RetinaFace is replaced by our detector's keypoints), the face parser's network (a SegFormer, handed to the official
path as BiSeNet's logits in BiSeNet's label order), the text embeddings (diffusers' `encode_prompt`) and the
sampler (PuLID's own k-diffusion loops are not restated: both sides step the same diffusers scheduler).
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn

from instantid_colab import memory, pipeline, smoke
from instantid_colab.engines import pulid
from instantid_colab.adapter import AdapterError
from instantid_colab.settings import SettingsError
from tests.latents import generate_with_latents, relative_difference
from tests.official_perceiver import FeedForward, PerceiverAttention
from tests.pictures import picture
from tests.test_official_equivalence import block_hidden_size

TOLERANCE = 1e-5
BISENET_LABELS = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r", "nose",
                  "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")  # facexlib's BiSeNet (19)
BG_LABEL = [0, 16, 18, 7, 8, 9, 14, 15]
OPENAI_DATASET_MEAN, OPENAI_DATASET_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# ---------------------------------------------------------------------------------------------
# eva_clip/rope.py and eva_clip/eva_vit_model.py, restated (EVA02-CLIP-L-14-336's options, no xformers)


def rotate_half(x):
    x = x.reshape(*x.shape[:-1], -1, 2)
    x1, x2 = x.unbind(dim=-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class VisionRotaryEmbeddingFast(nn.Module):
    def __init__(self, dim, pt_seq_len, ft_seq_len=None, theta=10000):
        super().__init__()
        freqs = 1. / (theta ** (torch.arange(0, dim, 2)[:(dim // 2)].float() / dim))
        t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
        freqs = torch.einsum('..., f -> ... f', t, freqs)
        freqs = freqs.repeat_interleave(2, dim=-1)  # repeat '... n -> ... (n r)', r=2
        freqs = torch.cat([freqs[:, None, :].expand(-1, len(t), -1), freqs[None, :, :].expand(len(t), -1, -1)], -1)
        self.register_buffer("freqs_cos", freqs.cos().view(-1, freqs.shape[-1]))
        self.register_buffer("freqs_sin", freqs.sin().view(-1, freqs.shape[-1]))

    def forward(self, t):
        return t * self.freqs_cos + rotate_half(t) * self.freqs_sin


class SwiGLU(nn.Module):
    def __init__(self, in_features, hidden_features, norm_layer):
        super().__init__()
        self.w1, self.w2 = nn.Linear(in_features, hidden_features), nn.Linear(in_features, hidden_features)
        self.act, self.ffn_ln = nn.SiLU(), norm_layer(hidden_features)
        self.w3 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.w3(self.ffn_ln(self.act(self.w1(x)) * self.w2(x)))


class EvaAttention(nn.Module):
    def __init__(self, dim, num_heads, rope, norm_layer):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.inner_attn_ln, self.proj, self.rope = norm_layer(dim), nn.Linear(dim, dim), rope

    def forward(self, x):
        B, N, C = x.shape
        q = F.linear(input=x, weight=self.q_proj.weight, bias=self.q_bias)
        k = F.linear(input=x, weight=self.k_proj.weight, bias=None)
        v = F.linear(input=x, weight=self.v_proj.weight, bias=self.v_bias)
        q, k, v = (t.reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3) for t in (q, k, v))
        q = torch.cat((q[:, :, :1, :], self.rope(q[:, :, 1:, :])), -2).type_as(v)
        k = torch.cat((k[:, :, :1, :], self.rope(k[:, :, 1:, :])), -2).type_as(v)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(self.inner_attn_ln(x))


class EvaBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio_hidden, rope, norm_layer):
        super().__init__()
        self.norm1, self.norm2 = norm_layer(dim), norm_layer(dim)
        self.attn = EvaAttention(dim, num_heads, rope, norm_layer)
        self.mlp = SwiGLU(dim, mlp_ratio_hidden, norm_layer)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)


class EVAVisionTransformer(nn.Module):
    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, hidden, num_classes, pt_hw_seq_len=16):
        super().__init__()
        norm_layer = lambda width: nn.LayerNorm(width, eps=1e-6)  # noqa: E731  partial(LayerNorm, eps=1e-6)
        self.image_size = img_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.rope = VisionRotaryEmbeddingFast(embed_dim // num_heads // 2, pt_hw_seq_len, img_size // patch_size)
        self.blocks = nn.ModuleList(EvaBlock(embed_dim, num_heads, hidden, self.rope, norm_layer) for _ in range(depth))
        self.norm = norm_layer(embed_dim)  # use_mean_pooling False: norm, then the class token
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x, return_all_features=False, return_hidden=True, shuffle=False):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        hidden_states = []
        for idx, blk in enumerate(self.blocks):
            if (0 < idx <= 20) and (idx % 4 == 0) and return_hidden:
                hidden_states.append(x)
            x = blk(x)
        return self.head(self.norm(x)[:, 0]), hidden_states


# ---------------------------------------------------------------------------------------------
# pulid/encoders_transformer.py (sizes as arguments: the official hard-codes 1024, 1280 and 1024)


class OfficialIDFormer(nn.Module):
    def __init__(self, dim, depth, dim_head, heads, num_id_token, num_queries, output_dim, ff_mult, vit_width,
                 id_width, mapping_width):
        super().__init__()
        self.num_id_token, self.dim, self.num_queries, self.depth = num_id_token, dim, num_queries, depth // 5
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim))
        self.proj_out = nn.Parameter(torch.randn(dim, output_dim))
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads),
                                                   FeedForward(dim=dim, mult=ff_mult)]) for _ in range(depth))

        def mapping(width_in, width_out):
            return nn.Sequential(nn.Linear(width_in, mapping_width), nn.LayerNorm(mapping_width), nn.LeakyReLU(),
                                 nn.Linear(mapping_width, mapping_width), nn.LayerNorm(mapping_width), nn.LeakyReLU(),
                                 nn.Linear(mapping_width, width_out))

        for i in range(5):
            setattr(self, f'mapping_{i}', mapping(vit_width, dim))
        self.id_embedding_mapping = mapping(id_width, dim * num_id_token)

    def forward(self, x, y):
        latents = self.latents.repeat(x.size(0), 1, 1)
        num_duotu = x.shape[1] if x.ndim == 3 else 1
        x = self.id_embedding_mapping(x)
        x = x.reshape(-1, self.num_id_token * num_duotu, self.dim)
        latents = torch.cat((latents, x), dim=1)
        for i in range(5):
            vit_feature = getattr(self, f'mapping_{i}')(y[i])
            ctx_feature = torch.cat((x, vit_feature), dim=1)
            for attn, ff in self.layers[i * self.depth: (i + 1) * self.depth]:
                latents = attn(ctx_feature, latents) + latents
                latents = ff(latents) + latents
        latents = latents[:, :self.num_queries]
        return latents @ self.proj_out


# ---------------------------------------------------------------------------------------------
# pulid/attention_processor.py (AttnProcessor2_0, IDAttnProcessor2_0; module settings as attributes)


class OfficialAttnProcessor(nn.Module):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 id_embedding=None, id_scale=1.0):
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        encoder_hidden_states = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](hidden_states)) / attn.rescale_output_factor


class OfficialIDAttnProcessor(nn.Module):
    NUM_ZERO, ORTHO, ORTHO_v2 = 20, False, True

    def __init__(self, hidden_size, cross_attention_dim=None):
        super().__init__()
        self.id_to_k = nn.Linear(cross_attention_dim or hidden_size, hidden_size, bias=False)
        self.id_to_v = nn.Linear(cross_attention_dim or hidden_size, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 id_embedding=None, id_scale=1.0):
        batch_size = encoder_hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if id_embedding is not None:
            if self.NUM_ZERO == 0:
                id_key = self.id_to_k(id_embedding).to(query.dtype)
                id_value = self.id_to_v(id_embedding).to(query.dtype)
            else:
                zero_tensor = torch.zeros((id_embedding.size(0), self.NUM_ZERO, id_embedding.size(-1)),
                                          dtype=id_embedding.dtype, device=id_embedding.device)
                id_key = self.id_to_k(torch.cat((id_embedding, zero_tensor), dim=1)).to(query.dtype)
                id_value = self.id_to_v(torch.cat((id_embedding, zero_tensor), dim=1)).to(query.dtype)
            id_key = id_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            id_value = id_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            id_hidden_states = F.scaled_dot_product_attention(query, id_key, id_value, attn_mask=None, dropout_p=0.0,
                                                              is_causal=False)
            id_hidden_states = id_hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
            id_hidden_states = id_hidden_states.to(query.dtype)
            if not self.ORTHO and not self.ORTHO_v2:
                hidden_states = hidden_states + id_scale * id_hidden_states
            elif self.ORTHO_v2:
                orig_dtype = hidden_states.dtype
                hidden_states = hidden_states.to(torch.float32)
                id_hidden_states = id_hidden_states.to(torch.float32)
                attn_map = query @ id_key.transpose(-2, -1)
                attn_mean = attn_map.softmax(dim=-1).mean(dim=1)
                attn_mean = attn_mean[:, :, :5].sum(dim=-1, keepdim=True)
                projection = (torch.sum((hidden_states * id_hidden_states), dim=-2, keepdim=True)
                              / torch.sum((hidden_states * hidden_states), dim=-2, keepdim=True) * hidden_states)
                orthogonal = id_hidden_states + (attn_mean - 1) * projection
                hidden_states = hidden_states + id_scale * orthogonal
                hidden_states = hidden_states.to(orig_dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states / attn.rescale_output_factor


# ---------------------------------------------------------------------------------------------
# pulid/pipeline_v1_1.py, restated


class OfficialPuLID:
    def __init__(self, session, files: pulid.PuLIDFiles):
        self.session = session
        self.unet = UNet2DConditionModel.from_pretrained(session.weights.base, subfolder="unet").eval()
        procs = {}
        for name in self.unet.attn_processors:  # hack_unet_attn_layers
            cross_attention_dim = None if name.endswith("attn1.processor") else self.unet.config.cross_attention_dim
            procs[name] = (OfficialIDAttnProcessor(block_hidden_size(self.unet, name), cross_attention_dim)
                           if cross_attention_dim is not None else OfficialAttnProcessor())
        self.unet.set_attn_processor(procs)
        self.id_adapter_attn_layers = nn.ModuleList(self.unet.attn_processors.values())
        checkpoint = torch.load(files.eva, map_location="cpu", weights_only=True)
        visual = {k[len("visual."):]: v for k, v in checkpoint.items() if k.startswith("visual.")}
        width, patch = visual["pos_embed"].shape[-1], visual["patch_embed.proj.weight"].shape[-1]
        self.clip_vision_model = EVAVisionTransformer(
            img_size=round((visual["pos_embed"].shape[1] - 1) ** 0.5) * patch, patch_size=patch, embed_dim=width,
            depth=len({k.split(".")[1] for k in visual if k.startswith("blocks.")}), num_heads=width // 64,
            hidden=visual["blocks.0.mlp.w1.weight"].shape[0], num_classes=visual["head.weight"].shape[0]).eval()
        # The rotary tables the file stores are what the official formula gives: the official model's own, compared
        # with the file's (written by our RotaryEmbedding) in test_id_tokens_equal_the_official_get_id_embedding.
        self.stored_rope = {k: v for k, v in visual.items() if ".rope." in f".{k}"}
        self.clip_vision_model.load_state_dict({**visual, **{k: v for k, v in self.clip_vision_model.state_dict().items()
                                                            if ".rope." in f".{k}"}})
        state_dict = load_file(str(files.adapter))  # load_pretrain
        groups: dict = {}
        for k, v in state_dict.items():
            module = k.split('.')[0]
            groups.setdefault(module, {})[k[len(module) + 1:]] = v
        adapter = groups["id_adapter"]
        dim = adapter["latents"].shape[-1]
        self.id_adapter = OfficialIDFormer(
            dim=dim, depth=len({k.split(".")[1] for k in adapter if k.startswith("layers.")}), dim_head=64,
            heads=adapter["layers.0.0.to_q.weight"].shape[0] // 64,
            num_id_token=adapter["id_embedding_mapping.6.weight"].shape[0] // dim,
            num_queries=adapter["latents"].shape[1], output_dim=adapter["proj_out"].shape[1],
            ff_mult=adapter["layers.0.1.1.weight"].shape[0] // dim, vit_width=width,
            id_width=adapter["id_embedding_mapping.0.weight"].shape[1],
            mapping_width=adapter["mapping_0.0.weight"].shape[0]).eval()
        for module in groups:
            getattr(self, module).load_state_dict(groups[module], strict=True)
        self.engine = session.identity_engine("pulid")  # for the parser only (shared, see the module docstring)

    def face_parse(self, x):
        """The SegFormer as BiSeNet answers: logits at the input's size, in BiSeNet's label order."""
        logits = self.engine.parser(pixel_values=x).logits
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        names = {name: int(i) for i, name in self.engine.parser.config.id2label.items()}
        return (logits[:, [names[label] for label in BISENET_LABELS]],)

    def to_gray(self, img):
        x = 0.299 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3]
        return x.repeat(1, 3, 1, 1)

    def align(self, image_bgr, landmark):
        """FaceRestoreHelper.align_warp_face (face_size 512, crop_ratio (1, 1), border 'constant')."""
        affine_matrix = cv2.estimateAffinePartial2D(landmark, pulid.TEMPLATE * (512 / 512.0), method=cv2.LMEDS)[0]
        return cv2.warpAffine(image_bgr, affine_matrix, (512, 512), borderMode=cv2.BORDER_CONSTANT,
                              borderValue=(135, 133, 132))

    @torch.no_grad()
    def get_id_embedding(self, image_list):
        id_cond_list, id_vit_hidden_list = [], []
        for image in image_list:
            image_bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
            face_info = self.session.faces.detect(image)
            id_ante_embedding = torch.from_numpy(np.asarray(face_info.embedding)).float()[None]
            align_face = self.align(image_bgr, np.asarray(face_info.kps, dtype=np.float32))
            input = torch.from_numpy(cv2.cvtColor(align_face, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)).float()[None] / 255.0
            mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
            parsing_out = self.face_parse((input - mean) / std)[0]
            parsing_out = parsing_out.argmax(dim=1, keepdim=True)
            bg = sum(parsing_out == i for i in BG_LABEL).bool()
            white_image = torch.ones_like(input)
            face_features_image = torch.where(bg, white_image, self.to_gray(input))
            size = self.clip_vision_model.image_size  # torchvision resize(tensor, size, BICUBIC), antialias on
            face_features_image = F.interpolate(face_features_image, size=(size, size), mode="bicubic",
                                                align_corners=False, antialias=True)
            face_features_image = (face_features_image - torch.tensor(OPENAI_DATASET_MEAN)[:, None, None]) / \
                torch.tensor(OPENAI_DATASET_STD)[:, None, None]
            id_cond_vit, id_vit_hidden = self.clip_vision_model(face_features_image, return_all_features=False,
                                                                return_hidden=True, shuffle=False)
            id_cond_vit = torch.div(id_cond_vit, torch.norm(id_cond_vit, 2, 1, True))
            id_cond_list.append(torch.cat([id_ante_embedding, id_cond_vit], dim=-1))
            id_vit_hidden_list.append(id_vit_hidden)
        id_uncond = torch.zeros_like(id_cond_list[0])
        id_vit_hidden_uncond = [torch.zeros_like(x) for x in id_vit_hidden_list[0]]
        id_cond = torch.stack(id_cond_list, dim=1)
        id_vit_hidden = list(id_vit_hidden_list[0])
        for i in range(1, len(image_list)):
            for j, x in enumerate(id_vit_hidden_list[i]):
                id_vit_hidden[j] = torch.cat([id_vit_hidden[j], x], dim=1)
        return self.id_adapter(id_uncond, id_vit_hidden_uncond), self.id_adapter(id_cond, id_vit_hidden)

    @torch.no_grad()
    def inference(self, settings, photos, ortho_v2=True):
        """app_v1_1.py's `run` (each ID photo resize_numpy_image_long(image, 1024), then get_id_embedding), then
        `inference` with `__call__` as its model: the UNet twice per step, mixed by the guidance scale; the sampler
        is the session's diffusers scheduler (see the module docstring)."""
        OfficialIDAttnProcessor.ORTHO_v2 = ortho_v2
        uncond_id_embedding, id_embedding = self.get_id_embedding(
            [resize_numpy_image_long(np.asarray(p.convert("RGB")), 1024) for p in photos])
        pipe, num = self.session.pipe, settings["num_images"]
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=settings["prompt"], negative_prompt=settings["negative_prompt"], device="cpu",
            num_images_per_prompt=num)
        height, width = settings["height"], settings["width"]
        add_time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(num, 1)
        scheduler = pipeline._make_scheduler(settings["scheduler"], self.session.scheduler_config)
        scheduler.set_timesteps(settings["steps"])
        generator = torch.Generator("cpu").manual_seed(settings["seed"])
        latents = torch.randn((num, 4, height // 8, width // 8), generator=generator) * scheduler.init_noise_sigma
        branches = [(prompt_embeds, pooled, id_embedding), (negative_prompt_embeds, negative_pooled, uncond_id_embedding)]
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            eps_positive, eps_negative = (
                self.unet(x, t, encoder_hidden_states=text, added_cond_kwargs={"text_embeds": pooled_text,
                                                                                 "time_ids": add_time_ids},
                          cross_attention_kwargs={'id_embedding': ids.repeat(num, 1, 1), 'id_scale':
                                                  settings["identity_settings"]["id_scale"]}, return_dict=False)[0]
                for text, pooled_text, ids in branches)
            noise_pred = eps_negative + settings["guidance_scale"] * (eps_positive - eps_negative)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        OfficialIDAttnProcessor.ORTHO_v2 = True
        return latents


def resize_numpy_image_long(image, resize_long_edge=768):
    """pulid/utils.py: the long side to `resize_long_edge` when longer, sizes truncated, OpenCV's Lanczos."""
    h, w = image.shape[:2]
    if max(h, w) <= resize_long_edge:
        return image
    k = resize_long_edge / max(h, w)
    h = int(h * k)
    w = int(w * k)
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LANCZOS4)


# ---------------------------------------------------------------------------------------------
# Ours against it


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    weights = smoke.build_smoke_weights(tmp_path_factory.mktemp("pulid") / "smoke")
    session = pipeline.load_pipeline(weights, memory.choose_plan(16, None), progress=False)
    return session, OfficialPuLID(session, pulid.ensure_files(weights, offline=True))


def test_id_tokens_equal_the_official_get_id_embedding(setup):
    session, official = setup
    photos = [smoke.sample_face_image(256), smoke.sample_face_image(256, face_color=(200, 170, 150))]
    own_rope = {k: v for k, v in official.clip_vision_model.state_dict().items() if ".rope." in f".{k}"}
    assert own_rope.keys() == official.stored_rope.keys() and len(own_rope) == 2 * (1 + 24)
    assert all(torch.allclose(own_rope[k], official.stored_rope[k], atol=1e-6) for k in own_rope)
    for given in (photos[:1], photos):
        negative, positive = session.identity_engine("pulid").id_tokens(session.faces, given, torch.device("cpu"))
        official_negative, official_positive = official.get_id_embedding([np.asarray(p) for p in given])
        assert positive.shape == official_positive.shape == (1, 8, 64)  # smoke IDFormer: 8 queries, UNet width 64
        assert relative_difference(positive, official_positive) < TOLERANCE
        assert relative_difference(negative, official_negative) < TOLERANCE


def test_a_big_photo_is_shrunk_as_the_official_app_shrinks_it_before_anything_else(setup):
    """A 1400x1050 photo (a phone photo is larger still): the app's resize to 1024 happens before detection,
    alignment and embedding, and it matters (the photo as given gives other tokens)."""
    session, official = setup
    big = picture((1400, 1050), [(560, 380, 280, (235, 200, 175))])
    negative, positive = session.identity_engine("pulid").id_tokens(session.faces, [big], torch.device("cpu"))
    shrunk = official.get_id_embedding([resize_numpy_image_long(np.asarray(big), 1024)])
    assert relative_difference(positive, shrunk[1]) < TOLERANCE and relative_difference(negative, shrunk[0]) < TOLERANCE
    as_given = official.get_id_embedding([np.asarray(big)])[1]
    assert relative_difference(positive, as_given) > 100 * TOLERANCE


def test_a_photo_bigger_than_the_working_size_reaches_pulid_whole(setup, monkeypatch, tmp_path):
    """Through `generate` from a file of 2600x1950: opened whole (not at our 2048 working size), then shrunk once,
    as the official app does; the latents equal the official run's."""
    session, official = setup
    path = tmp_path / "phone.png"
    picture((2600, 1950), [(1040, 700, 520, (235, 200, 175))]).save(path)
    result, latents = generate_with_latents(session, monkeypatch, str(path), "a portrait", identity="pulid",
                                            width=128, height=128, steps=3, seed=5)
    from PIL import Image

    assert relative_difference(latents, official.inference(result.settings, [Image.open(path)])) < TOLERANCE


CASES = {
    "official app defaults": dict(),
    "two photos, two images, ID scale 1.5": dict(num_images=2, adapter_strength=1.5, extra=True),
    "guidance 1.2, lightning-style steps": dict(guidance_scale=1.2, steps=4),
}


@pytest.mark.parametrize("case", CASES)
def test_pulid_equals_the_official_algorithm(setup, monkeypatch, case):
    session, official = setup
    options = dict(CASES[case])
    extra = [smoke.sample_face_image(256, face_color=(200, 170, 150))] if options.pop("extra", False) else []
    settings = {**dict(width=128, height=128, steps=3, seed=5, guidance_scale=5.0), **options}
    photo = smoke.sample_face_image(256)
    result, latents = generate_with_latents(session, monkeypatch, photo, "a portrait", identity="pulid",
                                            extra_face_images=extra, **settings)
    expected = official.inference(result.settings, [photo, *extra])
    assert latents.shape == expected.shape == (settings.get("num_images", 1), 4, 16, 16)
    assert relative_difference(latents, expected) < TOLERANCE


def test_the_comparison_sees_ortho_v2(setup, monkeypatch):
    """Without ortho v2 (the ID attention simply added) the latents differ: the test above can fail."""
    session, official = setup
    photo = smoke.sample_face_image(256)
    result, latents = generate_with_latents(session, monkeypatch, photo, "a portrait", identity="pulid",
                                            width=128, height=128, steps=3, seed=5)
    wrong = official.inference(result.settings, [photo], ortho_v2=False)
    assert relative_difference(latents, wrong) > 100 * TOLERANCE


def test_parser_labels_are_read_by_name(setup):
    """A parser whose labels come in another order finds the same background; one without them is refused."""
    session, _ = setup
    engine = session.identity_engine("pulid")
    config = engine.parser.config
    assert [config.id2label[i] for i in engine.background] == list(pulid.BACKGROUND_PARTS)
    shuffled = type(config)(id2label={i: f"{name}.png" for i, name in enumerate(BISENET_LABELS)})
    assert pulid.parser_background(shuffled, "x") == tuple(BG_LABEL)
    with pytest.raises(AdapterError, match="has no labels cloth, hat"):
        pulid.parser_background(type(config)(id2label={0: "background", 1: "skin"}), "parser/config.json")


def test_instantid_and_faceid_are_unchanged_by_a_pulid_picture(setup, monkeypatch):
    session, _ = setup
    photo = smoke.sample_face_image(256)
    kwargs = dict(width=128, height=128, steps=3, seed=7)
    before = {name: generate_with_latents(session, monkeypatch, photo, "a portrait", identity=name, **kwargs)[1]
              for name in ("instantid", "faceid-plusv2")}
    generate_with_latents(session, monkeypatch, photo, "a portrait", identity="pulid", **kwargs)
    for name, latents in before.items():
        assert torch.equal(latents, generate_with_latents(session, monkeypatch, photo, "a portrait", identity=name,
                                                          **kwargs)[1])
    assert session.pipe.unet.encoder_hid_proj is not None


def test_pulid_metadata_names_engine_settings_and_files(setup):
    session, _ = setup
    result = pipeline.generate(session, smoke.sample_face_image(256), "a portrait", identity="pulid",
                               adapter_strength=0.6, width=128, height=128, steps=2)
    metadata = result.image_metadata(0)
    assert metadata["identity_engine"] == "pulid"
    assert metadata["identity_settings"] == {
        "id_scale": 0.6, "num_zero": 20, "ortho": "v2",
        "model_files": ["guozinan/PuLID/pulid_v1.1.safetensors", "QuanSun/EVA-CLIP/EVA02_CLIP_L_336_psz14_s6B.pt",
                        "jonathandinu/face-parsing"]}
    assert metadata["identitynet_strength"] is None and metadata["combine"] is None


@pytest.mark.parametrize("kwargs, said", [
    (dict(pose_image="photo"), "identity pulid has no keypoint layout"),
    (dict(init_image="photo"), "does not start from a photo"),
    (dict(negative_noise=0.3), "negative_noise must be 0"),
])
def test_what_pulid_cannot_do_is_refused(setup, kwargs, said):
    session, _ = setup
    photo = smoke.sample_face_image(256)
    kwargs = {key: photo if value == "photo" else value for key, value in kwargs.items()}
    with pytest.raises(SettingsError, match=said):
        pipeline.generate(session, photo, "a portrait", identity="pulid", **kwargs)


def test_a_file_that_does_not_fit_is_named(setup):
    session, _ = setup
    files = session.identity_engine("pulid").files
    groups = pulid.read_groups(files.adapter)
    groups["id_adapter"].pop("latents")
    groups["id_adapter_attn_layers"]["1.id_to_k.weight"] = torch.zeros(3, 3)
    with pytest.raises(AdapterError) as error:
        pulid.check_fits(groups, session.pipe.unet, {"width": 128, "embed_dim": 64}, "bad.safetensors")
    said = str(error.value)
    assert "id_adapter.missing latents [1, 32, 128]" in said and said.count("\n  - ") == 2
    assert "id_adapter_attn_layers.1.id_to_k.weight: expected [64, 64], file has [3, 3]" in said
    assert "guozinan/PuLID pulid_v1.1.safetensors" in said


def test_pulid_runs_with_a_speed_mode_a_style_lora_an_extra_controlnet_and_a_guidance_interval(setup, monkeypatch):
    """The canny net alone is the pipeline's ControlNet (no IdentityNet); outside the guidance interval the UNet runs
    the conditional half only, and the ID tokens are cut with it (the negative's tokens do not reach it)."""
    from instantid_colab.controls import Control
    from instantid_colab.loras import Lora

    session, _ = setup
    seen, using = [], pipeline._using_controlnet
    monkeypatch.setattr(pipeline, "_using_controlnet", lambda caller, net: seen.append(net) or using(caller, net))
    batches = []
    layer = next(p for p in session.identity_engine("pulid").processors.values() if isinstance(p, pulid.IDAttnProcessor))
    call = pulid.IDAttnProcessor.__call__

    def spy(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, id_embedding=None,
            id_scale=1.0):  # the processor's own signature: diffusers hands a processor only the arguments it names
        if self is layer:
            batches.append((hidden_states.shape[0], id_embedding.shape[0]))
        return call(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, id_embedding, id_scale)

    monkeypatch.setattr(pulid.IDAttnProcessor, "__call__", spy)
    result = pipeline.generate(session, smoke.sample_face_image(256), "a portrait", identity="pulid",
                               speed="lightning-4", guidance_scale=3.0, guidance_interval=(0.3, 0.7), width=128,
                               height=128, loras=[Lora("smoke", 0.5)],
                               controls=[Control("canny", smoke.sample_face_image(256), 0.5, 0.0, 1.0, False)])
    (net,) = seen
    assert type(net).__name__ == "ControlNetModel"  # the canny net alone, no IdentityNet
    assert result.settings["speed"]["name"] == "lightning-4" and result.settings["steps"] == 4
    assert sorted(session.loras.active.values()) == [0.5, 1.0]  # the style LoRA and the speed LoRA; PuLID has none
    assert len(batches) == 4 and all(hidden == tokens for hidden, tokens in batches)
    assert [hidden for hidden, _ in batches].count(2) == result.settings["unconditional_steps"] == 1


def test_out_of_memory_with_pulid_moves_its_layers_off_the_unet_and_retries(setup, monkeypatch):
    """One out-of-memory error: a lighter plan (model offload), PuLID's waiting ID layers on the CPU, one retry."""
    session, _ = setup
    engine = session.identity_engine("pulid")
    lighter = dataclasses.replace(session.plan, placement="model_offload")
    monkeypatch.setattr(memory, "step_down", lambda plan: lighter)
    monkeypatch.setattr(memory, "apply", lambda plan, pipe: None)
    moved, to = [], pulid.PuLIDEngine.to
    monkeypatch.setattr(pulid.PuLIDEngine, "to", lambda self, device: moved.append(device) or to(self, device))
    failed = []

    def out_of_memory_once(module, args):
        if not failed:
            failed.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = session.pipe.unet.register_forward_pre_hook(out_of_memory_once)
    original = session.plan
    try:
        result = pipeline.generate(session, smoke.sample_face_image(256), "a portrait", identity="pulid",
                                   width=128, height=128, steps=2)
    finally:
        handle.remove()
        session.plan = original
    assert "cpu" in moved and engine is session.identity_engine("pulid")
    assert any("switched to 'model_offload'" in notice for notice in result.notices)


def test_pulid_from_the_command_line_and_its_refusals(tmp_path, capsys):
    import json

    from PIL import Image

    from instantid_colab import cli

    out = tmp_path / "pulid.png"
    assert cli.main(["generate", "--smoke", "--identity", "pulid", "--adapter-strength", "0.7", "--steps", "2",
                     "--weights-dir", str(tmp_path / "weights"), "--out", str(out)]) == 0
    metadata = json.loads(Image.open(out).text["instantid"])
    assert (metadata["identity_engine"], metadata["identity_settings"]["id_scale"]) == ("pulid", 0.7)
    assert metadata["label"] == "smoke: random weights"
    capsys.readouterr()
    code = cli.main(["generate", "--smoke", "--identity", "pulid", "--negative-noise", "0.3", "--init-image",
                     str(out), "--weights-dir", str(tmp_path / "not-made"), "--out", str(tmp_path / "no.png")])
    said = capsys.readouterr().err
    assert code == 2 and "negative_noise must be 0" in said and "does not start from a photo" in said
    assert not (tmp_path / "not-made").exists()  # refused before any weights were written or loaded


def test_pulid_is_a_bench_grid_value_and_a_manifest_value(tmp_path):
    from instantid_colab import batch
    from instantid_colab.bench.grid import parse_grid

    grid = parse_grid("identity=instantid,faceid-plusv2,pulid")
    assert [c.values["identity"] for c in grid] == ["instantid", "faceid-plusv2", "pulid"]
    smoke.sample_face_image(256).save(tmp_path / "face.png")
    (tmp_path / "rows.csv").write_text("face,identity,negative_noise\nface.png,pulid,0.2\n")
    with pytest.raises(batch.ManifestError, match="row 1.*negative_noise must be 0"):
        batch.prepare_rows(tmp_path / "rows.csv", smoke=True)
    (tmp_path / "rows.csv").write_text("face,identity,adapter_strength\nface.png,pulid,0.6\n")
    (row,) = batch.prepare_rows(tmp_path / "rows.csv", smoke=True)
    assert (row.values["identity"], row.values["adapter_strength"]) == ("pulid", 0.6)


def test_a_damaged_eva_clip_file_is_named_with_how_to_fetch_it_again(setup, tmp_path):
    from instantid_colab.weights import DamagedWeightsError

    session, _ = setup
    files = session.identity_engine("pulid").files
    damaged = tmp_path / pulid.EVA_FILE
    damaged.write_bytes(files.eva.read_bytes()[:5000])  # a download cut off
    with pytest.raises(DamagedWeightsError, match=rf"PuLID's EVA-CLIP encoder: {damaged} is damaged.*download --force"):
        pulid.load(session.pipe, dataclasses.replace(files, eva=damaged))
