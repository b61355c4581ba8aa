"""Every call uses its own sampler, whichever pipeline of the loaded session it runs through.

One loaded session makes many pictures (the app, `batch`, every `bench` grid). Each kind of call below is made twice
in a used session, first with one sampler (or speed mode) and then with another, and the second must equal the same
call in a fresh session: the ControlNet pipeline (InstantID), the img2img and inpaint views (start photo, masked
repaint, the refine pass, face swap) and the plain SDXL view (FaceID without a ControlNet, PuLID). A view built by an
earlier call once kept that call's sampler.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instantid_colab import pipeline, refine, smoke
from tests.latents import generate_with_latents
from tests.pictures import WARM, picture

FACE = smoke.sample_face_image()
PHOTO = picture((128, 128), [(40, 40, 48, WARM)])
MASK = picture((128, 128), [(32, 32, 64, (255, 255, 255))], background=(0, 0, 0)).convert("L")
COMMON = dict(width=128, height=128, steps=4, seed=7)

GENERATE = {
    "InstantID (the ControlNet pipeline)": dict(),
    "a start photo (img2img view)": dict(init_image=PHOTO, init_strength=0.75),
    "a masked repaint (inpaint view)": dict(init_image=PHOTO, init_mask=MASK, init_strength=0.75),
    "FaceID without a ControlNet (plain SDXL view)": dict(identity="faceid-plusv2"),
    "PuLID (plain SDXL view)": dict(identity="pulid"),
}
SWITCHES = {  # (the earlier call's settings, the compared call's)
    "sampler": (dict(scheduler="Euler"), dict(scheduler="DPM++ 2M Karras")),
    "speed mode": (dict(speed="lightning-4"), dict(speed="quality", steps=4, guidance_scale=5.0)),
}


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """(a session that has made pictures before, a fresh one): two loads of the same smoke weights."""
    weights = smoke.build_smoke_weights(tmp_path_factory.mktemp("samplers"))
    return pipeline.load_pipeline(weights, progress=False), pipeline.load_pipeline(weights, progress=False)


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("call", GENERATE)
def test_a_later_call_uses_its_own_sampler_in_every_view(sessions, monkeypatch, call, switch):
    used, fresh = sessions
    earlier, compared = SWITCHES[switch]
    first, second = ({**COMMON, **GENERATE[call], **chosen} for chosen in (earlier, compared))
    generate_with_latents(used, monkeypatch, FACE, "a portrait", **first)
    _, again = generate_with_latents(used, monkeypatch, FACE, "a portrait", **second)
    _, expected = generate_with_latents(fresh, monkeypatch, FACE, "a portrait", **second)
    assert torch.equal(again, expected)
    _, before = generate_with_latents(fresh, monkeypatch, FACE, "a portrait", **first)
    assert not torch.equal(before, expected)  # the two settings do make different pictures


def test_face_swap_and_the_refine_pass_use_their_own_sampler(sessions):
    used, fresh = sessions
    target = picture((640, 640), [(240, 200, 160, WARM)])
    swaps = {name: [refine.swap(session, target, FACE, steps=4, strength=0.3, seed=3, scheduler=scheduler).image
                    for scheduler in ("Euler", "DPM++ 2M Karras")] for name, session in (("used", used), ("fresh", fresh))}
    assert np.array_equal(np.asarray(swaps["used"][1]), np.asarray(swaps["fresh"][1]))
    assert not np.array_equal(np.asarray(swaps["fresh"][0]), np.asarray(swaps["fresh"][1]))

    refined = {}
    for name, session in (("used", used), ("fresh", fresh)):
        for scheduler in ("Euler", "DPM++ 2M Karras")[name == "fresh":]:  # the fresh session: the compared one only
            result = pipeline.generate(session, FACE, width=256, height=256, steps=4, seed=5, scheduler=scheduler)
            result.images[0] = picture((256, 256), [(96, 80, 64, WARM)])  # a face the smoke detector finds
            refine.refine_faces(session, result, 0.3, face_image=FACE)
            refined[name] = result.images[0]
    assert np.array_equal(np.asarray(refined["used"]), np.asarray(refined["fresh"]))
