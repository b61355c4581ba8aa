"""Registry of the ConvNeXtPose variants (timm style): architecture plus the paper's numbers.

The upsampling-layer count cannot be read from a state dict (bilinear upsampling has no weights),
so it lives here: XS/S upsample twice (32x32 heatmap), M/L three times (64x64). The paper's M/L
MACs (2.82 G / 4.30 G) only add up with three upsampling layers; see DESIGN.md section 6.
"""

from __future__ import annotations

from dataclasses import dataclass

INPUT_SIZE = 256
BACKBONE_STRIDE = 32
NUM_JOINTS = 18  # Human3.6M's 17 joints + thorax (3DMPPE convention)


@dataclass(frozen=True)
class PoseVariant:
    name: str
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    head_channels: int
    upsample_layers: int
    depth_dim: int
    joints: int = NUM_JOINTS
    input_size: int = INPUT_SIZE
    # Paper references (ConvNeXtPose, IEEE Access 2023); None where the paper gives no number.
    paper_mpjpe_p2: float | None = None
    paper_pa_mpjpe_p1: float | None = None
    paper_params: int | None = None  # exact parameter count of this architecture, BN buffers excluded
    paper_gmacs: float | None = None  # the paper's "GFLOPs" are MACs (torchprofile.profile_macs)

    @property
    def heatmap_size(self) -> int:
        return self.input_size // BACKBONE_STRIDE * 2**self.upsample_layers

    @property
    def final_rows(self) -> int:
        return self.joints * self.depth_dim


_FEMTO_L = dict(depths=(3, 3, 9, 3), dims=(48, 96, 192, 384))

VARIANTS: dict[str, PoseVariant] = {
    "XS": PoseVariant("XS", depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), head_channels=128,
                      upsample_layers=2, depth_dim=32, paper_mpjpe_p2=56.61, paper_params=3_528_008),
    "S": PoseVariant("S", **_FEMTO_L, head_channels=256, upsample_layers=2, depth_dim=32,
                     paper_mpjpe_p2=51.80, paper_params=7_438_976),
    "M": PoseVariant("M", **_FEMTO_L, head_channels=256, upsample_layers=3, depth_dim=64,
                     paper_mpjpe_p2=51.05, paper_pa_mpjpe_p1=34.5, paper_params=7_587_008, paper_gmacs=2.82),
    "L": PoseVariant("L", **_FEMTO_L, head_channels=512, upsample_layers=3, depth_dim=64,
                     paper_mpjpe_p2=49.75, paper_pa_mpjpe_p1=32.8, paper_params=8_380_352, paper_gmacs=4.30),
}


def get_variant(name: str) -> PoseVariant:
    try:
        return VARIANTS[name.upper()]
    except KeyError:
        raise ValueError(f"Unknown ConvNeXtPose variant {name!r}; choose one of {', '.join(VARIANTS)}.") from None

