"""ConvNeXtPose: ConvNeXt-BN backbone, depthwise-separable upsampling head, 3D soft-argmax.

Written by hand because no maintained library ships it: timm's ConvNeXt uses LayerNorm/GELU/Linear
and layer-scale, while the released checkpoints need BatchNorm/ReLU/1x1 convs and no layer-scale,
with the official module names (medialab-ku/ConvNeXtPose common/nets/convnext_bn.py, main/model.py)
so that their state dicts load strictly.
"""

from __future__ import annotations

import torch
from torch import nn

from instantid_colab.pose.variants import PoseVariant


class Block(nn.Module):
    """ConvNeXt block: 7x7 depthwise conv -> BN -> 1x1 conv (x4) -> ReLU -> 1x1 conv, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.BatchNorm2d(dim)
        self.pwconv1 = nn.Conv2d(dim, 4 * dim, kernel_size=1)
        self.act = nn.ReLU(inplace=True)
        self.pwconv2 = nn.Conv2d(4 * dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))


class ConvNeXtBN(nn.Module):
    """Stem Conv(k4,s4)+BN, three BN+Conv(k2,s2) downsamples, four stages, final BN; stride 32."""

    def __init__(self, depths: tuple[int, ...], dims: tuple[int, ...], in_chans: int = 3):
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), nn.BatchNorm2d(dims[0]))]
            + [nn.Sequential(nn.BatchNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2))
               for i in range(3)]
        )
        self.stages = nn.ModuleList(nn.Sequential(*[Block(dims[i]) for _ in range(depths[i])]) for i in range(4))
        self.norm = nn.BatchNorm2d(dims[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return self.norm(x)


class DeConv(nn.Module):
    """3x3 depthwise conv -> BN -> 1x1 conv -> ReLU -> bilinear x2 (align_corners=True) or identity."""

    def __init__(self, in_channels: int, out_channels: int, upsample: bool):
        super().__init__()
        self.dwconv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1, groups=in_channels)
        self.norm = nn.BatchNorm2d(in_channels)
        self.pwconv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.act = nn.ReLU(inplace=True)
        # nn.UpsamplingBilinear2d is what the official head uses (it implies align_corners=True).
        self.upsample = nn.UpsamplingBilinear2d(scale_factor=2) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.act(self.pwconv(self.norm(self.dwconv(x)))))


class HeadNet(nn.Module):
    """Three DeConv layers (the first `upsample_layers` of them upsample) and a 1x1 conv to J*D maps."""

    def __init__(self, in_channels: int, channels: int, upsample_layers: int, joints: int, depth_dim: int):
        super().__init__()
        self.deconv_layers_1 = DeConv(in_channels, channels, upsample=upsample_layers >= 1)
        self.deconv_layers_2 = DeConv(channels, channels, upsample=upsample_layers >= 2)
        self.deconv_layers_3 = DeConv(channels, channels, upsample=upsample_layers >= 3)
        self.final_layer = nn.Conv2d(channels, joints * depth_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layer(self.deconv_layers_3(self.deconv_layers_2(self.deconv_layers_1(x))))


def soft_argmax(heatmaps: torch.Tensor, joints: int, depth_dim: int) -> torch.Tensor:
    """(N, J*D, H, W) logits -> (N, J, 3) expected (x, y, z) in heatmap units, softmax over D*H*W.

    Computed in float32 even under fp16 autocast: the softmax over up to 262,144 bins loses
    precision in half.
    """
    n, _, height, width = heatmaps.shape
    probs = torch.softmax(heatmaps.float().reshape(n, joints, -1), dim=2).reshape(n, joints, depth_dim, height, width)
    device = heatmaps.device
    x = (probs.sum(dim=(2, 3)) * torch.arange(width, device=device, dtype=torch.float32)).sum(dim=2)
    y = (probs.sum(dim=(2, 4)) * torch.arange(height, device=device, dtype=torch.float32)).sum(dim=2)
    z = (probs.sum(dim=(3, 4)) * torch.arange(depth_dim, device=device, dtype=torch.float32)).sum(dim=2)
    return torch.stack((x, y, z), dim=2)


class ConvNeXtPose(nn.Module):
    """Image (N, 3, 256, 256), normalised as in 3DMPPE -> joints (N, J, 3) in heatmap units."""

    def __init__(self, variant: PoseVariant):
        super().__init__()
        self.variant = variant
        self.backbone = ConvNeXtBN(variant.depths, variant.dims)
        self.head = HeadNet(variant.dims[-1], variant.head_channels, variant.upsample_layers,
                            variant.joints, variant.depth_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return soft_argmax(self.head(self.backbone(images)), self.variant.joints, self.variant.depth_dim)


def count_parameters(model: nn.Module) -> int:
    """Learnable parameters only (BN running statistics are buffers and are not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_state_tensors(model: nn.Module) -> int:
    """Every element of the state dict: parameters + BN running mean/var + num_batches_tracked."""
    return sum(t.numel() for t in model.state_dict().values())
