import json

import numpy as np
import pytest
import torch

from instantid_colab.pose import h36m
from instantid_colab.pose.benchmark import SMOKE_LABEL
from instantid_colab.pose.cli import main


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    return h36m.write_synthetic_h36m(tmp_path_factory.mktemp("h36m") / "Human36M")


def _ground_truth_in_heatmap_units(root, testset, size, depth_dim):
    """GT straight from the JSON files (world -> camera -> pixel -> box -> heatmap), not via the loader."""
    table = {}
    for subject in (9, 11):
        prefix = root / "annotations" / f"Human36M_subject{subject}"
        data = json.loads((prefix.parent / f"{prefix.name}_data.json").read_text())
        cameras = json.loads((prefix.parent / f"{prefix.name}_camera.json").read_text())
        joints = json.loads((prefix.parent / f"{prefix.name}_joint_3d.json").read_text())
        for image in data["images"]:
            camera = cameras[str(image["cam_idx"])]
            world = np.array(joints[str(image["action_idx"])]["1"][str(image["frame_idx"])])
            world = np.vstack([world, (world[11] + world[14]) / 2])
            cam = np.array([np.array(camera["R"]) @ (x - np.array(camera["t"])) for x in world])
            u = cam[:, 0] / cam[:, 2] * camera["f"][0] + camera["c"][0]
            v = cam[:, 1] / cam[:, 2] * camera["f"][1] + camera["c"][1]
            table[image["id"]] = (u, v, cam[:, 2] - cam[0, 2])
    out = {}
    for row, image_id in enumerate(testset.image_ids):
        if int(image_id) not in table:
            continue
        x, y, w, h = testset.bboxes[row]
        u, v, dz = table[int(image_id)]
        out[int(image_id)] = np.stack([(u - x) / w * size, (v - y) / h * size, (dz / 1000 + 1) / 2 * depth_dim], 1)
    return out


class Oracle(torch.nn.Module):
    """Returns the GT joints in heatmap units for the sample it sees, read from the input pixels.

    Blue/red encode the image id; green says whether the patch is mirrored. A mirrored input gets
    the mirrored answer under 3DMPPE's flip rule, so flip averaging must undo it exactly.
    """

    def __init__(self, table, size):
        super().__init__()
        self.table, self.size = table, size

    def forward(self, images):
        rgb = images.numpy().transpose(0, 2, 3, 1) * h36m.PIXEL_STD + h36m.PIXEL_MEAN
        outputs = []
        for patch in rgb:
            red, _, blue = patch[128, 64]
            image_id = int(round((blue - 20) / 20)) + 10 * int(round((red - 20) / 20))
            coords = torch.tensor(self.table[image_id], dtype=torch.float32)
            if patch[128, 64, 1] < patch[128, 192, 1]:  # mirrored: x -> W - 1 - x, left <-> right
                coords[:, 0] = self.size - 1 - coords[:, 0]
                coords = coords[[0, 4, 5, 6, 1, 2, 3, 7, 8, 9, 10, 14, 15, 16, 11, 12, 13, 17]]
            outputs.append(coords)
        return torch.stack(outputs)


@pytest.mark.parametrize("protocol,size,depth_dim", [(2, 32, 32), (2, 64, 64), (1, 64, 64)])
def test_oracle_through_real_loader_scores_zero(dataset_root, protocol, size, depth_dim):
    testset = h36m.load_h36m_test(dataset_root, protocol)
    table = _ground_truth_in_heatmap_units(dataset_root, testset, size, depth_dim)
    loader = h36m.make_loader(testset, batch_size=3, num_workers=0)
    coords = h36m.predict(Oracle(table, size), loader, size, flip_test=True, progress=False)
    result = h36m.evaluate(testset, coords, size, depth_dim)
    assert result.metric == h36m.METRIC[protocol]
    assert result.score < 0.01 and result.mpjpe < 0.01 and result.pa_mpjpe_scaled < 0.01
    assert set(result.per_action) == {"Directions", "Discussion"}
    assert len(result.per_joint) == 17


def test_a_wrong_depth_shift_is_measured(dataset_root):
    testset = h36m.load_h36m_test(dataset_root, 2)
    table = _ground_truth_in_heatmap_units(dataset_root, testset, 32, 32)
    coords = np.stack([table[int(i)] for i in testset.image_ids])
    coords[:, 3, 2] += 32 / 20  # ankle 100 mm deeper: 1/17 of the joints off by ~100 mm
    result = h36m.evaluate(testset, coords, 32, 32)
    assert result.per_joint["R_Ankle"] == pytest.approx(100, rel=0.05)
    assert result.mpjpe == pytest.approx(100 / 17, rel=0.05)


def test_subjects_sampling_and_thorax(dataset_root):
    p2, p1 = h36m.load_h36m_test(dataset_root, 2), h36m.load_h36m_test(dataset_root, 1)
    # written: 2 subjects x 2 actions x frames (0, 32, 64) x 2 cameras; every 64th frame kept
    assert len(p2) == 16 and len(p1) == 8
    assert all("s_11_" in path for path in p1.img_paths)
    assert not any(path.endswith("_000033.jpg") for path in p2.img_paths)
    np.testing.assert_allclose(p2.joint_cam[:, 17], (p2.joint_cam[:, 11] + p2.joint_cam[:, 14]) / 2)


def test_crop_puts_the_box_on_the_patch():
    image = np.zeros((400, 600, 3), dtype=np.uint8)
    image[200:202, 300:302] = 255  # a 2x2 dot centred on pixel (300.5, 200.5)
    bbox = np.array([236.5, 136.5, 128.0, 128.0])  # dot at the box centre; box is 128 wide -> x2 zoom
    patch = h36m.crop_patch(image, bbox)
    ys, xs = np.nonzero(patch[:, :, 0] > 127)
    assert (xs.mean(), ys.mean()) == pytest.approx((128.5, 128.5), abs=0.6)


def test_process_bbox_fits_aspect_and_enlarges():
    np.testing.assert_allclose(h36m.process_bbox([100, 50, 101, 201], 1000, 1000),
                               [25.0, 50.0 + 100 - 125.0, 250.0, 250.0])
    assert h36m.process_bbox([10, 10, 0, 50], 100, 100) is None


def test_missing_files_say_which_and_where(tmp_path, dataset_root):
    with pytest.raises(h36m.H36MFileError, match=r"Human36M_subject9_data\.json was expected at .*annotations"):
        h36m.load_h36m_test(tmp_path, 2)
    testset = h36m.load_h36m_test(dataset_root, 1)
    testset.img_paths[0] = str(tmp_path / "images" / "gone.jpg")
    with pytest.raises(h36m.H36MFileError, match="gone.jpg"):
        h36m.H36MDataset(testset)[0]


def test_smoke_cli_runs_everything_and_resumes(tmp_path, capsys):
    argv = ["bench", "--smoke", "--variants", "XS", "--out", str(tmp_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert SMOKE_LABEL in printed and "| XS |" in printed and "P2 MPJPE" in printed
    cached = json.loads((tmp_path / "variant_XS.json").read_text())
    assert cached["params"] == 3_528_008 and cached["label"] == SMOKE_LABEL and cached["h36m"]["samples"] == 16
    assert (tmp_path / "accuracy_vs_speed.png").stat().st_size > 1000
    cached["score_mm"] = -1.0  # a rerun with the same settings must reuse the cache
    (tmp_path / "variant_XS.json").write_text(json.dumps(cached))
    assert main(argv) == 0
    assert "| -1.00 |" in capsys.readouterr().out
