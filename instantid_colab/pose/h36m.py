"""Human3.6M test set in 3DMPPE's annotation layout, and its evaluation (as ConvNeXtPose reports it).

Layout (3DMPPE_POSENET_RELEASE, data/Human36M):
  ROOT/annotations/Human36M_subject{S}_data.json   COCO-style images + annotations (GT bbox)
  ROOT/annotations/Human36M_subject{S}_camera.json {cam_idx: {R, t, f, c}}
  ROOT/annotations/Human36M_subject{S}_joint_3d.json {action: {subaction: {frame: 17x3 world mm}}}
  ROOT/images/s_09_act_02_subact_01_ca_01/s_09_act_02_subact_01_ca_01_000001.jpg
Protocols use 3DMPPE's numbering: 1 = test S11, PA-MPJPE (rigid, no scale); 2 = test S9+S11, MPJPE.
Every 64th frame, GT box (aspect fit, x1.25) and GT root depth, flip test. The conventions below
(crop, normalisation, flip rule) are those of data/Human36M/Human36M.py, data/dataset.py and
common/utils/pose_utils.py, so numbers are comparable with the paper.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from instantid_colab.pose import metrics

JOINT_NAMES = ("Pelvis", "R_Hip", "R_Knee", "R_Ankle", "L_Hip", "L_Knee", "L_Ankle", "Torso", "Neck", "Nose",
               "Head", "L_Shoulder", "L_Elbow", "L_Wrist", "R_Shoulder", "R_Elbow", "R_Wrist", "Thorax")
FLIP_PAIRS = ((1, 4), (2, 5), (3, 6), (14, 11), (15, 12), (16, 13))
EVAL_JOINTS = tuple(range(17))  # thorax (17) is added for training and left out of the score
ROOT = 0
L_SHOULDER, R_SHOULDER = 11, 14
ACTION_NAMES = ("Directions", "Discussion", "Eating", "Greeting", "Phoning", "Posing", "Purchases", "Sitting",
                "SittingDown", "Smoking", "Photo", "Waiting", "Walking", "WalkDog", "WalkTogether")
FIRST_ACTION_IDX = 2  # H36M action indices start at 2 ("act_02" = Directions)
TEST_SUBJECTS = {1: (11,), 2: (9, 11)}
METRIC = {1: "PA-MPJPE", 2: "MPJPE"}
SAMPLING = 64
INPUT_SIZE = 256
DEPTH_RANGE_MM = 2000.0  # bbox_3d_shape: depth bins span root_z +- 1000 mm
# 3DMPPE normalises the float 0..255 RGB patch with these (torchvision's ToTensor does not rescale
# float arrays), so the network input is (pixel - mean) / std on 0..255 values. The released weights
# were trained that way; do not divide by 255.
PIXEL_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
PIXEL_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
LAYOUT_HELP = ("Expected 3DMPPE's layout: ROOT/annotations/Human36M_subject{S}_{data,camera,joint_3d}.json and "
               "ROOT/images/s_09_act_02_subact_01_ca_01/*.jpg (see github.com/mks0601/3DMPPE_POSENET_RELEASE, "
               "'Human3.6M' in the README).")


class H36MFileError(FileNotFoundError):
    """A Human3.6M file is missing; the message says which and where it was expected."""


@dataclass
class H36MTestSet:
    """The protocol's test samples as arrays (one row per image, in annotation order)."""

    root: Path
    protocol: int
    img_paths: list[str]
    image_ids: np.ndarray  # (N,)
    bboxes: np.ndarray  # (N, 4) x, y, w, h after process_bbox
    joint_cam: np.ndarray  # (N, 18, 3) camera coordinates, mm
    focal: np.ndarray  # (N, 2)
    center: np.ndarray  # (N, 2)
    actions: np.ndarray  # (N,) index into ACTION_NAMES

    def __len__(self) -> int:
        return len(self.img_paths)

    @property
    def root_cam(self) -> np.ndarray:
        return self.joint_cam[:, ROOT]


def process_bbox(bbox, width: int, height: int, aspect_ratio: float = 1.0) -> np.ndarray | None:
    """3DMPPE's box: clip to the image, grow to the input aspect ratio, then enlarge x1.25."""
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, w - 1))
    y2 = min(height - 1.0, y1 + max(0.0, h - 1))
    if not (w * h > 0 and x2 >= x1 and y2 >= y1):
        return None
    w, h = x2 - x1, y2 - y1
    cx, cy = x1 + w / 2.0, y1 + h / 2.0
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    w, h = w * 1.25, h * 1.25
    return np.array([cx - w / 2.0, cy - h / 2.0, w, h])


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise H36MFileError(f"Human3.6M file missing: {path.name} was expected at {path}. {LAYOUT_HELP}")
    with open(path) as file:
        return json.load(file)


def load_h36m_test(root: str | Path, protocol: int = 2) -> H36MTestSet:
    """Read the protocol's test subjects, keep every 64th frame, project joints to each camera."""
    if protocol not in TEST_SUBJECTS:
        raise ValueError(f"protocol must be 1 (S11, PA-MPJPE) or 2 (S9+S11, MPJPE), not {protocol}")
    root = Path(root)
    rows: dict[str, list] = {k: [] for k in ("path", "id", "bbox", "cam", "f", "c", "action")}
    for subject in TEST_SUBJECTS[protocol]:
        stem = root / "annotations" / f"Human36M_subject{subject}"
        data = _read_json(Path(f"{stem}_data.json"))
        cameras = _read_json(Path(f"{stem}_camera.json"))
        joints = _read_json(Path(f"{stem}_joint_3d.json"))
        images = {image["id"]: image for image in data["images"]}
        for ann in data["annotations"]:
            image = images[ann["image_id"]]
            if image["subject"] != subject or image["frame_idx"] % SAMPLING != 0:
                continue
            bbox = process_bbox(ann["bbox"], image["width"], image["height"])
            if bbox is None:
                continue
            camera = cameras[str(image["cam_idx"])]
            world = np.asarray(joints[str(image["action_idx"])][str(image["subaction_idx"])][str(image["frame_idx"])],
                               dtype=np.float64)
            world = np.concatenate([world, (world[L_SHOULDER] + world[R_SHOULDER])[None] / 2.0])  # add thorax
            rotation, position = np.asarray(camera["R"], dtype=np.float64), np.asarray(camera["t"], dtype=np.float64)
            rows["cam"].append((world - position) @ rotation.T)  # world2cam: R (X - t)
            rows["path"].append(str(root / "images" / image["file_name"]))
            rows["id"].append(image["id"])
            rows["bbox"].append(bbox)
            rows["f"].append(camera["f"])
            rows["c"].append(camera["c"])
            rows["action"].append(image["action_idx"] - FIRST_ACTION_IDX)
    if not rows["path"]:
        raise H36MFileError(f"No protocol {protocol} test frames (every {SAMPLING}th frame of subjects "
                            f"{TEST_SUBJECTS[protocol]}) were found in {root / 'annotations'}. {LAYOUT_HELP}")
    return H36MTestSet(root, protocol, rows["path"], np.asarray(rows["id"]), np.asarray(rows["bbox"]),
                       np.asarray(rows["cam"]), np.asarray(rows["f"], dtype=np.float64),
                       np.asarray(rows["c"], dtype=np.float64), np.asarray(rows["action"]))


def patch_transform(bbox: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """2x3 affine from image pixels to the size x size patch: the bbox fills the patch.

    Equal to 3DMPPE's gen_trans_from_patch_cv at test time (scale 1, no rotation, no flip).
    """
    x, y, w, h = bbox
    sx, sy = size / w, size / h
    return np.array([[sx, 0.0, size / 2.0 - (x + w / 2.0) * sx], [0.0, sy, size / 2.0 - (y + h / 2.0) * sy]])


def crop_patch(image_bgr: np.ndarray, bbox: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Bilinear affine crop (cv2.warpAffine, black outside the image) -> RGB float32 (size, size, 3)."""
    import cv2  # only the image path needs OpenCV

    patch = cv2.warpAffine(image_bgr, patch_transform(bbox, size), (size, size), flags=cv2.INTER_LINEAR)
    return patch[:, :, ::-1].astype(np.float32)


def to_input(patch_rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) RGB 0..255 -> (3, H, W) network input, 3DMPPE normalisation (see PIXEL_MEAN)."""
    return torch.from_numpy(((patch_rgb - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1).copy())


class H36MDataset(Dataset):
    """Network inputs of a test set, in its order."""

    def __init__(self, testset: H36MTestSet):
        self.testset = testset

    def __len__(self) -> int:
        return len(self.testset)

    def __getitem__(self, index: int) -> torch.Tensor:
        import cv2

        path = self.testset.img_paths[index]
        image = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is None:
            raise H36MFileError(f"Human3.6M image missing or unreadable: {path}. {LAYOUT_HELP}")
        return to_input(crop_patch(image, self.testset.bboxes[index]))


def make_loader(testset: H36MTestSet, batch_size: int = 64, num_workers: int = 2) -> DataLoader:
    return DataLoader(H36MDataset(testset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available())


def flip_back(coords: torch.Tensor, heatmap_width: int) -> torch.Tensor:
    """Undo a horizontal image flip on (N, J, 3) heatmap coordinates: x' = W - x - 1, swap L/R.

    3DMPPE's rule, kept for comparability although the exact mirror of a flipped 256-pixel patch
    in heatmap units would be (256 - 1) / stride - x.
    """
    coords = coords.clone()
    coords[..., 0] = heatmap_width - coords[..., 0] - 1
    for left, right in FLIP_PAIRS:
        coords[:, [left, right]] = coords[:, [right, left]]
    return coords


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, heatmap_width: int, flip_test: bool = True,
            device: str | torch.device = "cpu", progress: bool = True, description: str = "H36M") -> np.ndarray:
    """Run the model over the loader -> (N, J, 3) heatmap coordinates, averaged with the flipped image."""
    from tqdm.auto import tqdm

    outputs = []
    for images in tqdm(loader, desc=description, disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        coords = model(images).float()
        if flip_test:
            coords = (coords + flip_back(model(torch.flip(images, dims=[3])).float(), heatmap_width)) / 2.0
        outputs.append(coords.cpu().numpy())
    return np.concatenate(outputs).astype(np.float64)


@dataclass
class H36MResult:
    protocol: int
    metric: str  # "MPJPE" (protocol 2) or "PA-MPJPE" (protocol 1, rigid alignment without scale)
    score: float  # mm, the protocol's metric over the 17 evaluation joints
    mpjpe: float
    pa_mpjpe: float  # rigid (3DMPPE)
    pa_mpjpe_scaled: float  # similarity Procrustes (MMPose p-mpjpe)
    samples: int
    per_joint: dict[str, float] = field(default_factory=dict)
    per_action: dict[str, float] = field(default_factory=dict)


def heatmap_to_camera(testset: H36MTestSet, coords: np.ndarray, heatmap_size: int, depth_dim: int) -> np.ndarray:
    """Heatmap units -> camera mm: box back to the image, depth around the GT root, pixel2cam."""
    bx, by, bw, bh = (testset.bboxes[:, i, None] for i in range(4))
    u = coords[..., 0] / heatmap_size * bw + bx
    v = coords[..., 1] / heatmap_size * bh + by
    z = (coords[..., 2] / depth_dim * 2.0 - 1.0) * (DEPTH_RANGE_MM / 2.0) + testset.root_cam[:, 2, None]
    x = (u - testset.center[:, 0, None]) / testset.focal[:, 0, None] * z
    y = (v - testset.center[:, 1, None]) / testset.focal[:, 1, None] * z
    return np.stack([x, y, z], axis=2)


def evaluate(testset: H36MTestSet, coords: np.ndarray, heatmap_size: int, depth_dim: int) -> H36MResult:
    """Score heatmap-unit predictions as 3DMPPE's Human36M.evaluate does (root-aligned, 17 joints)."""
    if len(coords) != len(testset):
        raise ValueError(f"{len(coords)} predictions for {len(testset)} test samples")
    pred = metrics.root_relative(heatmap_to_camera(testset, coords, heatmap_size, depth_dim), ROOT)
    gt = metrics.root_relative(testset.joint_cam, ROOT)
    joints = list(EVAL_JOINTS)
    # 3DMPPE aligns on all 18 joints (thorax included) and then scores the 17.
    rigid = metrics.procrustes_align(pred, gt)[:, joints]
    scaled = metrics.procrustes_align(pred, gt, scale=True)[:, joints]
    pred, gt = pred[:, joints], gt[:, joints]
    errors = metrics.joint_errors(rigid if testset.protocol == 1 else pred, gt)
    return H36MResult(
        protocol=testset.protocol, metric=METRIC[testset.protocol], score=float(errors.mean()),
        mpjpe=metrics.mpjpe(pred, gt), pa_mpjpe=metrics.mpjpe(rigid, gt), pa_mpjpe_scaled=metrics.mpjpe(scaled, gt),
        samples=len(testset), per_joint=metrics.per_joint(errors, JOINT_NAMES[:17]),
        per_action=metrics.per_action(errors, testset.actions, ACTION_NAMES),
    )


# Synthetic data in the same layout: tests and smoke mode run the real loader on it.

_CANONICAL_POSE = np.array([  # 17 H36M joints, world mm, z up, person facing -y
    [0, 0, 900], [-130, 0, 900], [-130, 0, 480], [-130, 0, 80], [130, 0, 900], [130, 0, 480], [130, 0, 80],
    [0, 0, 1130], [0, 0, 1400], [0, -60, 1500], [0, 0, 1600], [170, 0, 1380], [430, 0, 1380], [680, 0, 1380],
    [-170, 0, 1380], [-430, 0, 1380], [-680, 0, 1380]], dtype=np.float64)
SYNTHETIC_IMAGE_SIZE = (1000, 1002)  # width, height as in Human3.6M


def synthetic_code_colour(image_id: int) -> tuple[int, int]:
    """(blue, red) values that encode an image id in a synthetic frame (ids below 100)."""
    return 20 + 20 * (image_id % 10), 20 + 20 * (image_id // 10)


def _look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """World-to-camera rotation (rows: camera x right, y down, z forward) looking at target."""
    forward = (target - position) / np.linalg.norm(target - position)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    return np.stack([right, np.cross(forward, right), forward])


def write_synthetic_h36m(root: str | Path, subjects: tuple[int, ...] = (9, 11), frames: tuple[int, ...] = (0, 32, 64),
                         cameras: tuple[int, ...] = (1, 2), seed: int = 0) -> Path:
    """Write a tiny Human3.6M-layout set (annotations + JPEGs) under root.

    Frames not divisible by 64 are written too, so the loader's subsampling is exercised. Each
    image is flat colour: blue/red encode the image id (synthetic_code_colour) and green is 220
    left of the box centre and 30 right of it, so a test can tell which sample, and whether it
    was mirrored, from the network input alone.
    """
    import cv2

    root, rng = Path(root), np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    width, height = SYNTHETIC_IMAGE_SIZE
    image_id = 0
    for subject in subjects:
        camera_json, joint_json, images, annotations = {}, {}, [], []
        for cam in cameras:
            angle = rng.uniform(0, 2 * np.pi)
            position = np.array([4500 * np.cos(angle), 4500 * np.sin(angle), 1500 + rng.uniform(-200, 200)])
            camera_json[str(cam)] = {"R": _look_at(position, np.array([0.0, 0.0, 1000.0])).tolist(),
                                     "t": position.tolist(), "f": [1145.0 + cam, 1143.0 + cam],
                                     "c": [512.0 + rng.uniform(-5, 5), 515.0 + rng.uniform(-5, 5)]}
        for action in (2, 3):
            for frame in frames:
                pose = _CANONICAL_POSE + rng.normal(scale=40.0, size=_CANONICAL_POSE.shape)
                joint_json.setdefault(str(action), {}).setdefault("1", {})[str(frame)] = pose.tolist()
                for cam in cameras:
                    camera = camera_json[str(cam)]
                    cam_coords = (pose - np.array(camera["t"])) @ np.array(camera["R"]).T
                    pixels = cam_coords[:, :2] / cam_coords[:, 2:] * np.array(camera["f"]) + np.array(camera["c"])
                    (x0, y0), (x1, y1) = pixels.min(0) - 20, pixels.max(0) + 20
                    name = f"s_{subject:02d}_act_{action:02d}_subact_01_ca_{cam:02d}"
                    file_name = f"{name}/{name}_{frame + 1:06d}.jpg"
                    blue, red = synthetic_code_colour(image_id)
                    picture = np.zeros((height, width, 3), dtype=np.uint8)
                    picture[:, :, 0], picture[:, :, 2] = blue, red
                    centre = int(round((x0 + x1) / 2))
                    picture[:, :centre, 1], picture[:, centre:, 1] = 220, 30
                    (root / "images" / name).mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(root / "images" / file_name), picture, [cv2.IMWRITE_JPEG_QUALITY, 100])
                    images.append({"id": image_id, "file_name": file_name, "width": width, "height": height,
                                   "subject": subject, "action_name": ACTION_NAMES[action - FIRST_ACTION_IDX],
                                   "action_idx": action, "subaction_idx": 1, "cam_idx": cam, "frame_idx": frame})
                    annotations.append({"id": image_id, "image_id": image_id, "keypoints_vis": [True] * 17,
                                        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]})
                    image_id += 1
        prefix = root / "annotations" / f"Human36M_subject{subject}"
        for suffix, content in (("data", {"images": images, "annotations": annotations}),
                                ("camera", camera_json), ("joint_3d", joint_json)):
            Path(f"{prefix}_{suffix}.json").write_text(json.dumps(content))
    return root
