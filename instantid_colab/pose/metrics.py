"""3D pose errors on (N, J, 3) arrays in millimetres, vectorised over samples.

Two alignments are in use under the name "PA-MPJPE": 3DMPPE/ConvNeXtPose's `rigid_align`
(rotation + translation, NO scale; what their Protocol 1 numbers use) and the similarity
Procrustes of HMR/MMPose (`p-mpjpe`, with scale). `scale=` picks one; the default matches
the paper being reproduced. Written with numpy because MMPose's version is per-sample and
pulls in the whole MMPose stack.
"""

from __future__ import annotations

import numpy as np


def root_relative(joints: np.ndarray, root: int = 0) -> np.ndarray:
    """Subtract the root joint (pelvis in Human3.6M) from every joint."""
    joints = np.asarray(joints, dtype=np.float64)
    return joints - joints[:, root : root + 1]


def joint_errors(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(N, J) Euclidean distance per joint."""
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[2] != 3:
        raise ValueError(f"pred and gt must both be (N, J, 3); got {pred.shape} and {gt.shape}")
    return np.linalg.norm(pred - gt, axis=2)


def mpjpe(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean per-joint position error, no alignment (root-align first with root_relative)."""
    return float(joint_errors(pred, gt).mean())


def procrustes_align(pred: np.ndarray, gt: np.ndarray, scale: bool = False) -> np.ndarray:
    """Align each pred to its gt by rotation + translation (+ uniform scale if `scale`).

    Kabsch/Umeyama with the reflection fix (flip the sign of the smallest singular direction),
    the same solution as 3DMPPE's rigid_transform_3D when scale=False.
    """
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    mean_p, mean_g = pred.mean(axis=1, keepdims=True), gt.mean(axis=1, keepdims=True)
    p, g = pred - mean_p, gt - mean_g
    u, s, vt = np.linalg.svd(np.einsum("nji,njk->nik", p, g))  # H = P^T G, (N, 3, 3)
    sign = np.sign(np.linalg.det(np.einsum("nji,nkj->nik", vt, u)))  # det(V U^T)
    sign[sign == 0] = 1.0
    d = np.ones_like(s)
    d[:, 2] = sign
    rotation = np.einsum("nji,nj,nkj->nik", vt, d, u)  # R = V diag(d) U^T
    factor = (s * d).sum(axis=1) / (p**2).sum(axis=(1, 2)) if scale else np.ones(len(pred))
    return factor[:, None, None] * np.einsum("nik,njk->nji", rotation, p) + mean_g


def pa_mpjpe(pred: np.ndarray, gt: np.ndarray, scale: bool = False) -> float:
    """MPJPE after Procrustes alignment; scale=False is 3DMPPE's rigid alignment, True is MMPose's."""
    return float(joint_errors(procrustes_align(pred, gt, scale=scale), gt).mean())


def per_joint(errors: np.ndarray, names: tuple[str, ...] | list[str]) -> dict[str, float]:
    """Mean error of each joint over samples; `errors` is (N, J)."""
    return {name: float(value) for name, value in zip(names, np.asarray(errors).mean(axis=0))}


def per_action(errors: np.ndarray, actions: np.ndarray, names: tuple[str, ...] | list[str]) -> dict[str, float]:
    """Mean error per action; `actions` holds an index into `names` for each sample.

    Actions with no samples are left out (3DMPPE prints NaN for them).
    """
    errors, actions = np.asarray(errors), np.asarray(actions)
    return {names[a]: float(errors[actions == a].mean()) for a in range(len(names)) if np.any(actions == a)}
