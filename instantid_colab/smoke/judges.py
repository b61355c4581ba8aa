"""The identity benchmark's judges with random weights (smoke: random weights), in the real file layout.

`write_clip` writes a CLIP model folder as openai/clip-vit-large-patch14 has it (config, safetensors, tokenizer,
image processor), tiny by default or at CLIP-L's real sizes for the GPU benchmarks; `write_sface` an ONNX file
with SFace's signature (1x3x112x112 -> 128) that OpenCV's FaceRecognizerSF loads: a fixed random projection of
the 8x8-pooled aligned face, so the same face gives the same embedding and other colours differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TINY_CLIP = {"text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
             "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8),
             "projection_dim": 16}
CLIP_L = {"text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
          "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=224, patch_size=14),
          "projection_dim": 768}


def write_clip(folder: Path, sizes: dict = TINY_CLIP, seed: int = 8, dtype: torch.dtype = torch.float32,
               shared_bias: float | None = 2.0) -> Path:
    """Every file of `judges.CLIP_FILES`: a random CLIPModel of `sizes`, our byte-level CLIP tokenizer, and
    CLIP's image processor at the vision tower's input side.

    `shared_bias` (towers of one width): both towers' last norm get this bias and both projections the same
    weights, so every picture and prompt share a direction and their cosines come out positive (a CLIP score
    above 0, as with a trained CLIP, instead of random signs clipped to 0); what they say is still noise."""
    from transformers import CLIPConfig, CLIPModel

    from instantid_colab.components import pil_image_processor
    from instantid_colab.smoke.diffusion import write_tokenizer

    vocab_size = write_tokenizer(folder, pad_token="<|endoftext|>")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}), encoding="utf-8")
    text = {**sizes["text"], "vocab_size": vocab_size, "max_position_embeddings": 77, "eos_token_id": vocab_size - 1,
            "bos_token_id": vocab_size - 2, "pad_token_id": vocab_size - 1}
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=sizes["vision"],
                                 projection_dim=sizes["projection_dim"]))
    if shared_bias is not None:
        with torch.no_grad():
            model.text_projection.weight.copy_(model.visual_projection.weight)
            model.vision_model.post_layernorm.bias.fill_(shared_bias)
            model.text_model.final_layer_norm.bias.fill_(shared_bias)
    model.to(dtype).save_pretrained(folder)
    side = sizes["vision"]["image_size"]
    pil_image_processor("CLIPImageProcessor")(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(folder)
    return folder


def write_sface(path: Path, seed: int = 9) -> Path:
    """An ONNX file OpenCV's FaceRecognizerSF runs like SFace: input `data` 1x3x112x112, output `fc1` 1x128."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from instantid_colab.smoke.faces import IR_VERSION, OPSET

    projection = np.random.default_rng(seed).standard_normal((3 * 8 * 8, 128)).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["data"], ["pooled"], kernel_shape=[14, 14], strides=[14, 14]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
        helper.make_node("Constant", [], ["projection"], value=numpy_helper.from_array(projection, "projection")),
        helper.make_node("MatMul", ["features", "projection"], ["fc1"]),
    ]
    graph = helper.make_graph(nodes, "smoke_sface",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 128])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
