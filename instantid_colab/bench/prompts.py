"""The prompts an identity benchmark uses: PuLID's protocol prompt, a varied built-in set, or a file.

The built-in set covers what users ask of a likeness: photos and paintings, close-ups and full bodies, scenes,
clothing and actions. Each prompt says where it comes from; prompts written for a man or a woman ("a man",
"1girl") say "a person", so that one set serves every face.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from instantid_colab.textfiles import read_text

PULID = "PuLID (arXiv 2404.16022), evaluation protocol and app_v1_1.py default prompt"
PULID_EXAMPLES = "PuLID app_v1_1.py examples"
INSTANTID = "InstantID (instantX-research/InstantID)"
FACEID = "h94/IP-Adapter-FaceID model card"
WRITTEN_HERE = "written for this benchmark"


@dataclass(frozen=True)
class Prompt:
    text: str
    source: str


PROTOCOL = Prompt("portrait, color, cinematic, in garden, soft light, detailed face", PULID)
BUILT_IN: tuple[Prompt, ...] = (
    PROTOCOL,
    Prompt("photo of a person in a red jacket in a garden", f"{FACEID} ('a woman in red dress', made neutral)"),
    Prompt("analog film photo of a person. faded film, desaturated, 35mm photo, grainy, vignette, vintage, "
           "Kodachrome, Lomography, stained, highly detailed, found footage", f"{INSTANTID} infer.py ('a man')"),
    Prompt("film noir style, ink sketch, a person, highly detailed, sharp focus, monochrome, high contrast, "
           "dramatic shadows, 1940s style, mysterious, cinematic", f"{INSTANTID} README ('male man')"),
    Prompt("portrait, blacklight", PULID_EXAMPLES),
    Prompt("pixel art, a person", f"{PULID_EXAMPLES} ('1boy')"),
    Prompt("cinematic film still, close up, photo of a person near grasses, intense sunlight, brooding mood, light "
           "amber and red, analog film grain", f"{PULID_EXAMPLES} ('redheaded girl', weights removed)"),
    Prompt("instagram photo, photo of a person in a black sweater, hard shadows", f"{PULID_EXAMPLES} ('23 y.o man')"),
    Prompt("sticker art, a person", f"{PULID_EXAMPLES} ('1girl')"),
    Prompt("Chinese paper-cut, a person", f"{PULID_EXAMPLES} ('1girl')"),
    Prompt("Studio Ghibli, a person", f"{PULID_EXAMPLES} ('1boy')"),
    Prompt("a person made of ice sculpture", f"{PULID_EXAMPLES} ('1man')"),
    Prompt("made of little stones, portrait", PULID_EXAMPLES),
    Prompt("1990s Japanese anime, a person", f"{PULID_EXAMPLES} ('1girl')"),
    Prompt("full-body photo of a person hiking on a mountain trail with a backpack, wide shot", WRITTEN_HERE),
    Prompt("a person cooking in a busy restaurant kitchen, chef's uniform, action shot", WRITTEN_HERE),
    Prompt("close-up photo of a person in the rain at night, neon reflections", WRITTEN_HERE),
    Prompt("a person as an astronaut floating inside a space station", WRITTEN_HERE),
    Prompt("oil painting of a person in Renaissance clothing, museum portrait", WRITTEN_HERE),
    Prompt("full-body photo of a person riding a bicycle down a city street, motion blur", WRITTEN_HERE),
    Prompt("watercolor illustration of a person reading a book in a cafe", WRITTEN_HERE),
    Prompt("a person in a business suit giving a talk on a stage, audience in the foreground", WRITTEN_HERE),
)
SETS = {"builtin": BUILT_IN, "protocol": (PROTOCOL,)}


def load_prompts(choice: str) -> tuple[Prompt, ...]:
    """`builtin` (the set above), `protocol` (PuLID's one prompt) or a text file: one prompt a line, blank lines
    and lines starting with # skipped. ValueError names a file that is missing, holds no prompt or repeats one."""
    if choice in SETS:
        return SETS[choice]
    path = Path(choice).expanduser()
    if not path.is_file():
        raise ValueError(f"--prompts {choice}: no such file; give a text file (one prompt a line) or one of: "
                         f"{', '.join(SETS)}")
    lines = [line.strip() for line in read_text(path, "--prompts", "save it as UTF-8 text").splitlines()]
    first_line: dict[str, int] = {}
    repeated = []
    for number, line in enumerate(lines, 1):
        if line and not line.startswith("#"):
            if line in first_line:  # results are kept by prompt: a repeat would be counted and never made
                repeated.append(f"line {number} repeats line {first_line[line]}")
            first_line.setdefault(line, number)
    if repeated:
        raise ValueError(f"--prompts {path}: {'; '.join(repeated[:5])}; give each prompt once (--seeds makes more "
                         "images of a prompt)")
    if not first_line:
        raise ValueError(f"--prompts {path} holds no prompt (one a line; lines starting with # are comments)")
    return tuple(Prompt(line, str(path)) for line in first_line)
