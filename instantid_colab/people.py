"""Several people in one picture, each keeping their own face (DESIGN.md section 8).

The official InstantID knows one face. For person i this module makes what that one face had: an identity
embedding from i's photos, a keypoint image holding i's five points only, and a region, the part of the
picture where i's identity acts (the face box enlarged to head and shoulders, or a mask given by the user).
`identity` applies them: the IdentityNet runs once per person (diffusers' MultiControlNetModel gives each
slot its own keypoint image and sums the residuals, each weighted by that person's region), and in the IP
attention the positions of region i attend to person i's face tokens only. Regions are made disjoint, so no
position ever gets two people's tokens. Where each person goes: the faces of a layout photo, matched left to
right (or in a given order), or, without one, side-by-side face boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from instantid_colab import faces
from instantid_colab.images import ImageLike, open_image
from instantid_colab.settings import LIMITS, SettingsError, number

AUTO_SIZE = (1152, 896)  # an SDXL training size, landscape: room for people side by side
AUTO_FACE_HEIGHT = 0.35  # face centres at this fraction of the height, as in a group portrait
AUTO_FACE_SIDE = 0.45  # face box side as a fraction of each person's slot width (at most 0.3 of the height)
# Head and shoulders around a face box of side s: 1.25 s to each side of its centre, from 0.4 s above the box to
# 1.5 s below it. Where two regions overlap, a position belongs to the person whose face centre is nearer.
HEAD_AND_SHOULDERS = (1.25, 0.4, 1.5)
NO_FACE_IN_REGION = "no face found in this person's region of the generated image"


class PeopleError(ValueError):
    """People and a layout that do not fit together; the message says what to change."""


@dataclass(frozen=True)
class Person:
    """One person: one or more photos of them (combined like extra reference faces), and optionally a mask
    picture saying where they go (white: their region)."""

    photos: tuple[ImageLike, ...]
    mask: ImageLike | None = None


@dataclass
class Cast:
    """Everything the pipeline needs about the people of one picture, in person order."""

    embeddings: list[np.ndarray]  # one identity per person (faces.combine_embeddings of their photos)
    boxes: np.ndarray  # [people, 4] face boxes in output pixels
    kps: np.ndarray  # [people, 5, 2] keypoints in output pixels
    masks: np.ndarray | None  # [people, height, width] 0/1, disjoint; None: one face, no gate
    size: tuple[int, int]  # output (width, height)

    def kps_images(self) -> list[Image.Image]:
        """Each person's IdentityNet condition: their five keypoints only, the official drawing."""
        return [faces.draw_kps(self.size, kps) for kps in self.kps]

    def describe(self, photos: list[int]) -> list[dict]:
        """What the PNG metadata records per person (likeness is added per image)."""
        return [{"photos": count, "face_box": [int(round(v)) for v in box]} for count, box in zip(photos, self.boxes)]


def parse_person(text: str, base: Path | None = None) -> Person:
    """`PHOTO[+PHOTO...]` (the CLI's `--person`, a manifest's `people`): photos of one person, relative to
    `base` when given. A file whose name holds '+' is taken as one photo when it exists."""
    def where(name: str) -> str:
        path = Path(name.strip()).expanduser()
        return str(path if base is None or path.is_absolute() else base / path)

    if not text.strip():
        raise SettingsError(["a person needs a photo: PHOTO[+PHOTO...]"])
    whole = where(text)
    return Person((whole,) if Path(whole).exists() else tuple(where(part) for part in text.split("+") if part.strip()))


def parse_order(text: str | None, count: int) -> list[int] | None:
    """`2,1`: the person (numbered as given, from 1) for each face of the layout photo, left to right."""
    if text is None or not str(text).strip():
        return None
    parts = [part.strip() for part in str(text).split(",")]
    # isdecimal, not isdigit: superscripts and other "digits" int() cannot read are refused with the message below
    order = [int(part) for part in parts] if all(part.isdecimal() for part in parts) else None
    problem = _order_problem(order, count, repr(text))
    if problem:
        raise SettingsError([problem])
    return order


def _order_problem(order: list[int] | None, count: int, shown: str) -> str | None:
    """Why `order` (None: not numbers) is not the people 1 to `count` once each, or None when it is."""
    if order is not None and sorted(order) == list(range(1, count + 1)):
        return None
    return f"order {shown} must list the people 1 to {count} once each, e.g. {','.join(map(str, range(count, 0, -1)))}"


def from_text(persons: list[str], masks: list[str] | None = None, order: str | None = None,
              base: Path | None = None, has_layout: bool = True) -> tuple[list[Person], list[int] | None]:
    """What a command line or a manifest row says (`PHOTO[+PHOTO...]` per person, a mask per person, `2,1`;
    paths relative to `base` when given), as checked people with every photo and mask opened once, so a bad
    file fails before any model loads. `has_layout`: whether a pose (layout) photo is given, which `order` needs."""
    parsed = [parse_person(text, base) for text in persons]
    if masks and len(masks) != len(parsed):
        raise SettingsError([f"{len(masks)} masks for {len(parsed)} people: give one mask per person, or none"])
    masks = [parse_person(mask, base).photos[0] for mask in masks or ()]
    people = [Person(tuple(open_image(photo, f"photo of person {index}") for photo in person.photos),
                     open_image(masks[index - 1], f"mask of person {index}") if masks else None)
              for index, person in enumerate(parsed, 1)]
    ordered = parse_order(order, len(people))
    return check_people(people, ordered, has_layout), ordered


ORDER_NEEDS_LAYOUT = ("order places the people on the faces of the pose (layout) photo, left to right; without one "
                      "they stand side by side in the order given: give a pose photo, or leave order out")


def check_people(people, order: list[int] | None = None, has_layout: bool = True) -> list[Person]:
    """1 to 4 people (`settings.LIMITS["people"]`), each with at least one photo and a mask with some white when
    given; `order` a permutation, and only with a layout photo to place them on."""
    people = list(people)
    _, problem = number("people", len(people), LIMITS["people"])
    problems = [problem] if problem else []
    problems += [f"person {index} has no photo" for index, person in enumerate(people, 1) if not person.photos]
    problems += [f"the mask of person {index} is all black, which gives them no place in the picture: white marks "
                 "where they go" for index, person in enumerate(people, 1)
                 if isinstance(person.mask, Image.Image) and person.mask.convert("L").getextrema()[1] == 0]
    if order is not None and not has_layout:
        problems.append(ORDER_NEEDS_LAYOUT)
    elif order is not None and (wrong_order := _order_problem(order, len(people), str(order))):
        problems.append(wrong_order)
    if problems:
        raise SettingsError(problems)
    return people


def auto_layout(count: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(boxes [count, 4], kps [count, 5, 2]): faces side by side, each the ArcFace template's five points
    (insightface's `arcface_dst`, the pose every face is aligned to) scaled into its box."""
    from insightface.utils.face_align import arcface_dst

    width, height = size
    slot = width / count
    side = min(AUTO_FACE_SIDE * slot, 0.3 * height)
    boxes, kps = [], []
    for index in range(count):
        left, top = (index + 0.5) * slot - side / 2, AUTO_FACE_HEIGHT * height - side / 2
        boxes.append([left, top, left + side, top + side])
        kps.append(np.asarray(arcface_dst, np.float64) / 112.0 * side + [left, top])
    return np.asarray(boxes), np.asarray(kps)


def layout_from_photo(found: list[faces.Face], count: int, source: tuple[int, int], size: tuple[int, int],
                      order: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """(boxes, kps) in person order from the faces of a layout photo (left to right), scaled to `size`."""
    if len(found) != count:
        raise PeopleError(f"The layout photo has {len(found)} face{'s' if len(found) != 1 else ''} but {count} people "
                          f"were given: use a photo with exactly {count} faces, or none (the people are then placed "
                          "side by side).")
    scale = np.array([size[0] / source[0], size[1] / source[1]])
    by_person = sorted(zip(order or range(1, count + 1), found), key=lambda pair: pair[0])
    boxes = np.asarray([face.bbox.reshape(2, 2) * scale for _, face in by_person]).reshape(count, 4)
    return boxes, np.asarray([face.kps * scale for _, face in by_person])


def head_and_shoulders(box: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The face box enlarged to head and shoulders (HEAD_AND_SHOULDERS), clipped to the picture."""
    x1, y1, x2, y2 = box
    side, centre = max(x2 - x1, y2 - y1), (x1 + x2) / 2
    across, above, below = HEAD_AND_SHOULDERS
    return np.clip([centre - across * side, y1 - above * side, centre + across * side, y2 + below * side],
                   0, [size[0], size[1], size[0], size[1]])


def regions(boxes: np.ndarray, size: tuple[int, int], masks: list[Image.Image | None]) -> np.ndarray:
    """[people, height, width] 0/1 masks: each person's given mask (white = theirs) or head and shoulders,
    made disjoint: a position claimed by several people belongs to the one whose face centre is nearest."""
    width, height = size
    claimed = np.zeros((len(boxes), height, width), bool)
    for index, (box, mask) in enumerate(zip(boxes, masks)):
        if mask is not None:
            claimed[index] = np.asarray(mask.convert("L").resize(size, Image.NEAREST)) > 127
        else:
            x1, y1, x2, y2 = np.round(head_and_shoulders(box, size)).astype(int)
            claimed[index, y1:y2, x1:x2] = True
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    rows, cols = np.mgrid[0:height, 0:width]
    distance = np.stack([(cols - cx) ** 2 + (rows - cy) ** 2 for cx, cy in centres])
    nearest = np.where(claimed, distance, np.inf).argmin(axis=0)
    owned = (np.arange(len(boxes))[:, None, None] == nearest[None]) & claimed
    return owned.astype(np.float32)


def cast(analyzer: faces.FaceAnalyzer, people: list[Person], combine: str, size: tuple[int, int],
         layout_image: Image.Image | None = None, order: list[int] | None = None) -> Cast:
    """Identities, places (the layout photo's faces, or side by side) and regions of `people` (checked by
    `check_people`) in a picture of `size` (width, height)."""
    embeddings = [_identity(analyzer, person, index, combine) for index, person in enumerate(people, 1)]
    if layout_image is None:
        boxes, kps = auto_layout(len(people), size)
    else:
        boxes, kps = layout_from_photo(analyzer.detect_all(layout_image), len(people), layout_image.size, size, order)
    masks = [None if person.mask is None else open_image(person.mask, f"mask of person {index}")
             for index, person in enumerate(people, 1)]
    return Cast(embeddings, boxes, kps, regions(boxes, size, masks), size)


def _identity(analyzer: faces.FaceAnalyzer, person: Person, index: int, combine: str):
    """The person's embedding from their photos; a photo without a face is named with the person's number."""
    photos = []
    for place, photo in enumerate(person.photos, 1):
        opened = open_image(photo, f"photo of person {index}")
        try:
            analyzer.detect(opened)
        except faces.NoFaceError as error:
            which = f"photo {place} of person {index}" if len(person.photos) > 1 else f"the photo of person {index}"
            raise faces.NoFaceError(f"{which}: {error}") from None
        photos.append(opened)
    return analyzer.embed(photos, combine)[0]


def faces_in_regions(found: list[faces.Face], cast: Cast) -> list[faces.Face | None]:
    """Per person: the largest of `found` whose centre lies in that person's region, or None."""
    chosen = []
    for mask in cast.masks:
        inside = [face for face in found if _centre_in(face, mask)]
        chosen.append(max(inside, key=lambda face: face.area) if inside else None)
    return chosen


def likeness(analyzer: faces.FaceAnalyzer, cast: Cast, image: Image.Image) -> list[faces.Likeness]:
    """Per person: the face in their region (`faces_in_regions`) scored against that person's identity
    (None, and why, when their region shows no face)."""
    return [faces.Likeness(None, NO_FACE_IN_REGION) if face is None else faces.likeness_of(embedding, face)
            for embedding, face in zip(cast.embeddings, faces_in_regions(analyzer.detect_all(image), cast))]


def least_alike(scores: list[faces.Likeness]) -> faces.Likeness:
    """A picture's likeness with several people: its weakest person's (one whose face was not found first)."""
    return min(scores, key=lambda score: (score.similarity is not None, score.similarity or 0.0))


def _centre_in(face: faces.Face, mask: np.ndarray) -> bool:
    x = int(np.clip((face.bbox[0] + face.bbox[2]) / 2, 0, mask.shape[1] - 1))
    y = int(np.clip((face.bbox[1] + face.bbox[3]) / 2, 0, mask.shape[0] - 1))
    return bool(mask[y, x])
