import numpy as np
import pytest

from instantid_colab.pose.metrics import mpjpe, pa_mpjpe, per_action, per_joint, procrustes_align, root_relative


def _rotation(rng):
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


@pytest.fixture
def poses():
    return np.random.default_rng(0).normal(size=(4, 17, 3)) * 300


def test_rigidly_moved_copy(poses):
    rng = np.random.default_rng(1)
    moved = np.stack([p @ _rotation(rng).T + rng.normal(size=3) * 100 for p in poses])
    assert mpjpe(moved, poses) > 50
    assert pa_mpjpe(moved, poses) < 1e-8
    assert pa_mpjpe(moved, poses, scale=True) < 1e-8


def test_scaled_copy_is_zero_only_with_scale(poses):
    scaled = 1.2 * poses
    assert pa_mpjpe(scaled, poses) > 10
    assert pa_mpjpe(scaled, poses, scale=True) < 1e-8


def test_matches_3dmppe_rigid_align_including_reflection(poses):
    def rigid_align(a, b):  # 3DMPPE common/utils/pose_utils.py
        ca, cb = a.mean(0), b.mean(0)
        u, _, v = np.linalg.svd((a - ca).T @ (b - cb))
        r = v.T @ u.T
        if np.linalg.det(r) < 0:
            v[2] = -v[2]
            r = v.T @ u.T
        return (r @ a.T).T + (cb - r @ ca)

    noisy = poses + np.random.default_rng(2).normal(size=poses.shape) * 40
    noisy[0, :, 0] *= -1  # a mirrored sample takes the reflection branch
    expected = np.stack([rigid_align(a, b) for a, b in zip(noisy, poses)])
    np.testing.assert_allclose(procrustes_align(noisy, poses), expected, atol=1e-8)


def test_known_values_and_breakdowns():
    gt = np.zeros((2, 3, 3))
    pred = gt.copy()
    pred[0, 1] = [3, 4, 0]  # 5 mm on joint 1 of sample 0
    pred[1, 2] = [0, 0, 10]  # 10 mm on joint 2 of sample 1
    assert mpjpe(pred, gt) == pytest.approx(15 / 6)
    errors = np.linalg.norm(pred - gt, axis=2)
    assert per_joint(errors, ["a", "b", "c"]) == {"a": 0.0, "b": 2.5, "c": 5.0}
    assert per_action(errors, np.array([0, 2]), ["x", "y", "z"]) == {"x": 5 / 3, "z": 10 / 3}
    np.testing.assert_allclose(root_relative(pred)[0, 1], [3, 4, 0])


def test_shape_mismatch_message():
    with pytest.raises(ValueError, match=r"\(N, J, 3\)"):
        mpjpe(np.zeros((2, 17, 3)), np.zeros((2, 18, 3)))
