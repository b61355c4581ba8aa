"""Tiny random ViTPose and Depth Anything models in the transformers layout (smoke: random weights).

They let the pose and depth annotation path (processor, model, post-processing, drawing) run offline
through the same `from_pretrained` calls as the real annotators; what they see means nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch


def write_tiny_vitpose(folder: Path, seed: int = 5) -> Path:
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation

    from instantid_colab.components import pil_image_processor

    backbone = VitPoseBackboneConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=[64, 48],
                                     patch_size=[16, 16], mlp_ratio=2)
    torch.manual_seed(seed)
    VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, num_labels=17)).save_pretrained(folder)
    pil_image_processor("VitPoseImageProcessor")(size={"height": 64, "width": 48}).save_pretrained(folder)
    return folder


def write_tiny_depth_anything(folder: Path, seed: int = 6) -> Path:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    from instantid_colab.components import pil_image_processor

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=56, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, patch_size=14)
    torch.manual_seed(seed)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    pil_image_processor("DPTImageProcessor")(size={"height": 56, "width": 56}, keep_aspect_ratio=True,
                                             ensure_multiple_of=14, do_pad=False).save_pretrained(folder)
    return folder
