import pytest
import torch

from instantid_colab.pose.benchmark import count_macs
from instantid_colab.pose.model import ConvNeXtPose, count_parameters, count_state_tensors, soft_argmax
from instantid_colab.pose.variants import VARIANTS, get_variant

# Parameters (no BN buffers) from DESIGN.md; with BN buffers incl. num_batches_tracked they match the
# all-tensor counts printed for the released S/M/L files.
EXPECTED = {"XS": (3_528_008, 3_534_140, 32), "S": (7_438_976, 7_448_954, 32),
            "M": (7_587_008, 7_596_986, 64), "L": (8_380_352, 8_391_354, 64)}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_parameter_counts_and_heatmap(name):
    params, with_buffers, heatmap = EXPECTED[name]
    model = ConvNeXtPose(get_variant(name)).eval()
    assert count_parameters(model) == params == VARIANTS[name].paper_params
    assert count_state_tensors(model) == with_buffers
    logits = model.head(model.backbone(torch.zeros(1, 3, 256, 256)))
    assert logits.shape == (1, 18 * VARIANTS[name].depth_dim, heatmap, heatmap)


def test_macs_match_paper_for_m_and_l():
    for name in ("M", "L"):
        macs = count_macs(ConvNeXtPose(get_variant(name)).eval()) / 1e9
        assert abs(macs - VARIANTS[name].paper_gmacs) < 0.05, (name, macs)


def test_soft_argmax_recovers_a_sharp_peak():
    joints, depth, size = 2, 8, 16
    logits = torch.full((1, joints * depth, size, size), -50.0)
    logits[0, 0 * depth + 5, 3, 11] = 50.0  # joint 0: z=5, y=3, x=11
    logits[0, 1 * depth + 2, 9, 4] = 50.0  # joint 1: z=2, y=9, x=4
    coords = soft_argmax(logits, joints, depth)
    assert torch.allclose(coords, torch.tensor([[[11.0, 3.0, 5.0], [4.0, 9.0, 2.0]]]), atol=1e-4)


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="XS, S, M, L"):
        get_variant("XL")
