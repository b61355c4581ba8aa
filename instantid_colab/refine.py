"""A face made again at full resolution inside a picture that otherwise stays as it is: the refine pass after a
generation (`--refine-face`), and putting a person into an existing photo (`swap`).

Both are the same mechanism, assembled from diffusers' pieces: the face box, grown a little, is the region to
repaint, feathered with `VaeImageProcessor.blur`; `get_crop_region` finds a square around it with margin; the
crop, resized to 1024 ("fill", as diffusers' `padding_mask_crop` does), goes through InstantID with diffusers'
SDXL ControlNet inpaint pipeline (`pipeline.generate` with `init_image`, `init_mask`, and the crop as the pose
image, so the IdentityNet sees the crop's own keypoints); the result goes back in its place and `apply_overlay`
blends it through the feathered region. Outside the feathered region every pixel is the input's. Only the crop
goes through the model, so a photo of any size costs what a 1024x1024 image costs. What is ours: which face, the margins, and
when a face is left alone (one that already fills most of the picture gains nothing from a crop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from PIL import Image, ImageDraw

from instantid_colab import engines, pipeline
from instantid_colab.faces import Likeness, NoFaceError, likeness_of
from instantid_colab.images import ImageLike, open_image
from instantid_colab.loras import Lora
from instantid_colab.people import Person, faces_in_regions
from instantid_colab.png_metadata import attach_metadata
from instantid_colab.settings import REFINE_STRENGTH, SettingsError, check_arguments

CROP_SIZE = 1024  # the crop is made at SDXL's own resolution
MARGIN = 0.4  # the crop reaches this many face sides beyond the repainted region's box on every side
MASK_GROW = 0.15  # the repainted region: the face box grown by this fraction of its side on every side
FEATHER = 0.08  # the region's soft edge: Gaussian blur radius as a fraction of the face side
MIN_UPSCALE = 1.25  # refine leaves a face alone when its crop would be enlarged less than this
SWAP_STRENGTH = 0.7
TOO_BIG = "covers most of the picture already (its crop would not be enlarged): left as it is"


@dataclass
class Repainted:
    """One face repainted: the whole picture with it pasted back, where, and the crop's own generation."""

    image: Image.Image
    face_box: list[int]
    crop_box: tuple[int, int, int, int]
    crop: Any  # pipeline.GenerationResult of the 1024x1024 crop


def regions(size: tuple[int, int], box: Sequence[float]) -> tuple[Image.Image, Image.Image]:
    """(sharp, feathered) masks of the picture's size: the face box grown by MASK_GROW of its side, white."""
    from diffusers.image_processor import VaeImageProcessor

    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1)
    grow = MASK_GROW * side
    sharp = Image.new("L", size, 0)
    ImageDraw.Draw(sharp).rectangle([x1 - grow, y1 - grow, x2 + grow, y2 + grow], fill=255)
    return sharp, VaeImageProcessor.blur(sharp, max(1, round(FEATHER * side)))


def repaint_face(session, image: Image.Image, box: Sequence[float], strength: float, *,
                 minimum_upscale: float = 0.0, **generation) -> Repainted | None:
    """The face in `box` of `image` made again through a 1024x1024 crop (`generation`: pipeline.generate's
    identity and settings); None when the crop would be enlarged less than `minimum_upscale`."""
    processor = session.pipe.image_processor
    sharp, feathered = regions(image.size, box)
    side = max(box[2] - box[0], box[3] - box[1])
    crop_box = processor.get_crop_region(sharp, CROP_SIZE, CROP_SIZE, pad=round(MARGIN * side))
    if CROP_SIZE / max(crop_box[2] - crop_box[0], crop_box[3] - crop_box[1]) < minimum_upscale:
        return None
    piece = processor.resize(image.crop(crop_box), CROP_SIZE, CROP_SIZE, resize_mode="fill")
    mask = processor.resize(feathered.crop(crop_box), CROP_SIZE, CROP_SIZE, resize_mode="fill")
    crop = pipeline.generate(session, pose_image=piece, init_image=piece, init_mask=mask, init_strength=strength,
                             width=CROP_SIZE, height=CROP_SIZE, **generation)
    # Placed here rather than by apply_overlay's crop_coords: diffusers < 0.32 sized that result to the crop, not
    # the photo. Blending through the feathered mask stays diffusers' in every version.
    x1, y1, x2, y2 = crop_box
    placed = image.copy()
    placed.paste(processor.resize(crop.images[0], y2 - y1, x2 - x1, resize_mode="crop"), (x1, y1))
    pasted = processor.apply_overlay(feathered, image, placed)
    return Repainted(pasted, [int(round(v)) for v in box], tuple(crop_box), crop)


def _same_settings(settings: dict, seed: int) -> dict[str, Any]:
    """pipeline.generate's keywords that remake a picture's look: its (styled) prompts, strengths, speed mode (its
    distilled LoRA with it), sampler, guidance and guidance interval, style LoRAs."""
    return dict(prompt=settings["prompt"], negative_prompt=settings["negative_prompt"], style="No style",
                identitynet_strength=settings["identitynet_strength"], adapter_strength=settings["adapter_strength"],
                speed=settings["speed"]["name"], steps=settings["steps"], guidance_scale=settings["guidance_scale"],
                scheduler=settings["scheduler"], guidance_interval=settings["guidance_interval"],
                negative_noise=settings["negative_noise"], combine=settings["combine"],
                loras=[Lora(lora["name"], lora["scale"]) for lora in settings["loras"]], seed=seed)


USED = ("speed", "steps", "guidance_scale", "scheduler", "guidance_interval", "unconditional_steps", "loras", "seed")


def refine_faces(session, result, strength: float = REFINE_STRENGTH, face_image: ImageLike | None = None,
                 extra_face_images: Sequence[ImageLike] = (), people: Sequence[Person] = ()):
    """Each face of each image of `result` made again at full resolution with its own identity (the photos the
    result was made from: `face_image` + `extra_face_images`, or `people`). Changes `result` in place: images,
    likeness (before and after, in the metadata as "refine_face"), notices."""
    (strength,) = check_arguments(strength=(strength, "refine_strength"))
    method = engines.method(result.settings.get("identity_engine"))
    if not method.refine:
        raise SettingsError([method.no_refine()])
    started = time.perf_counter()
    cast = result.cast
    result.refined = [None] * len(result.images)
    for index, image in enumerate(result.images):
        seed = (result.seed + 1 + index) % (2**32)
        faces = _faces_by_person(session, cast, image, bool(people))
        done, skipped, used = 0, [], None
        for person, face in enumerate(faces):
            if face is None:
                continue
            photos = people[person].photos if people else (face_image, *extra_face_images)
            identity = dict(face_image=photos[0], extra_face_images=tuple(photos[1:]))  # the crop shows one face
            repainted = repaint_face(session, image, face.bbox, strength, minimum_upscale=MIN_UPSCALE, **identity,
                                     **_same_settings(result.settings, seed))
            if repainted is None:
                skipped.append(person + 1)
                continue
            image, done = repainted.image, done + 1
            used = {key: repainted.crop.settings[key] for key in USED}
            result.notices += repainted.crop.notices
        result.refined[index] = {"strength": strength, "faces": done, "left_alone": skipped, "used": used}
        for person in skipped:
            who = f"person {person}'s face" if people else "the face"
            result.notices.append(f"image {index + 1}: {who} {TOO_BIG}")
        _rescore(session, result, index, image)
    result.seconds += time.perf_counter() - started
    result.attach_metadata()
    return result


def _faces_by_person(session, cast, image: Image.Image, as_people: bool) -> list:
    """The face to refine per person: in their region the largest found (people), or the largest in the picture."""
    if not as_people:
        try:
            return [session.faces.detect(image, retries=False)]
        except NoFaceError:
            return [None]
    return faces_in_regions(session.faces.detect_all(image), cast)


def _rescore(session, result, index: int, image: Image.Image) -> None:
    """The refined picture in place of the old one, its likeness after, and the one before in "refine_face"."""
    result.refined[index]["identity_similarity_before"] = (
        [score.similarity for score in result.people_likeness[index]] if result.people_likeness
        else result.likeness[index].similarity)
    result.images[index] = image
    result.score(session.faces, index)


def _likeness_in_box(session, embedding, image: Image.Image, box) -> Likeness:
    """The likeness of the face found where `box` is (the swapped one, not the largest of a group photo)."""
    for found in session.faces.detect_all(image):
        x, y = (found.bbox[0] + found.bbox[2]) / 2, (found.bbox[1] + found.bbox[3]) / 2
        if box[0] <= x <= box[2] and box[1] <= y <= box[3]:
            return likeness_of(embedding, found)
    return Likeness(None, "no face found where the swapped face is")


@dataclass
class SwapResult:
    """A photo with one face given another person's identity; its PNG metadata holds "swap"."""

    image: Image.Image
    face_box: list[int]
    strength: float
    likeness: Any  # faces.Likeness of the new face to the face photo
    seed: int
    seconds: float
    label: str | None = None
    notices: list[str] = field(default_factory=list)


def swap(session, target: ImageLike, face_image: ImageLike, *, which: int | None = None,
         strength: float = SWAP_STRENGTH, prompt: str = "", seed: int = 42, **settings) -> SwapResult:
    """`target` as it is, but its face (the `which`-th from the left, from 1; default the largest) has the
    identity of the person in `face_image`. `settings`: pipeline.generate's (steps, strengths, style, ...)."""
    (strength,) = check_arguments(strength=(strength, "init_strength"))
    started = time.perf_counter()
    photo = open_image(target, "target photo", max_side=None)  # full size, upright: only the crop is generated
    found = session.faces.detect_all(photo)
    if not found:
        raise NoFaceError("No face found in the target photo: swap needs a photo with a clearly visible face.")
    if which is not None:
        (which,) = check_arguments(which=(which, "which_face"))
        if which > len(found):
            raise NoFaceError(f"The target photo has {len(found)} face{'s' if len(found) > 1 else ''}; --which {which} "
                              f"asks for face {which} from the left.")
    face = found[which - 1] if which is not None else max(found, key=lambda candidate: candidate.area)
    repainted = repaint_face(session, photo, face.bbox, strength, face_image=face_image, prompt=prompt, seed=seed,
                             **settings)
    likeness = _likeness_in_box(session, repainted.crop.cast.embeddings[0], repainted.image, face.bbox)
    result = SwapResult(repainted.image, repainted.face_box, strength, likeness, seed, 0.0, repainted.crop.label,
                        list(repainted.crop.notices))
    metadata = {**repainted.crop.settings, "width": photo.width, "height": photo.height,
                "swap": {"face_box": result.face_box, "strength": strength, "which": which,
                         "crop_box": list(repainted.crop_box)},
                "identity_similarity": likeness.similarity, "identity_similarity_note": likeness.note}
    attach_metadata(result.image, metadata, result.label)
    result.seconds = time.perf_counter() - started
    return result

