"""The official InstantID demo styles, as data.

Each style is a prompt template with a `{prompt}` slot and a negative prompt that is put in front of
the user's negative (the official `apply_style` rule). Adding a style is adding one entry.
"""

from __future__ import annotations

from typing import NamedTuple


class Style(NamedTuple):
    prompt: str
    negative: str


_QUALITY_NEGATIVE = (
    "(lowres, low quality, worst quality:1.2), (text:1.2), watermark, (frame:1.2), deformed, ugly, "
    "deformed eyes, blur, out of focus, blurry, deformed cat, deformed, photo, anthropomorphic cat, "
    "monochrome, photo, pet collar, gun, weapon, blue, 3d, drones, drone, buildings in background, green"
)

# Strings as in instantX-research/InstantID gradio_demo/style_template.py.
STYLES: dict[str, Style] = {
    "No style": Style("{prompt}", ""),
    "Watercolor": Style(
        "watercolor painting, {prompt}. vibrant, beautiful, painterly, detailed, textural, artistic",
        "(lowres, low quality, worst quality:1.2), (text:1.2), watermark, anime, photorealistic, 35mm film, "
        "deformed, glitch, low contrast, noisy",
    ),
    "Film Noir": Style(
        "film noir style, ink sketch|vector, {prompt} highly detailed, sharp focus, ultra sharpness, monochrome, "
        "high contrast, dramatic shadows, 1940s style, mysterious, cinematic",
        _QUALITY_NEGATIVE,
    ),
    "Neon": Style(
        "masterpiece painting, buildings in the backdrop, kaleidoscope, lilac orange blue cream fuchsia bright "
        "vivid gradient colors, the scene is cinematic, {prompt}, emotional realism, double exposure, watercolor "
        "ink pencil, graded wash, color layering, magic realism, figurative painting, intricate motifs, organic "
        "tracery, polished",
        _QUALITY_NEGATIVE,
    ),
    "Jungle": Style(
        'waist-up "{prompt} in a Jungle" by Syd Mead, tangerine cold color palette, muted colors, detailed, '
        "8k,photo r3al,dripping paint,3d toon style,3d style,Movie Still",
        _QUALITY_NEGATIVE,
    ),
    "Mars": Style(
        "{prompt}, Post-apocalyptic. Mars Colony, Scavengers roam the wastelands searching for valuable "
        "resources, rovers, bright morning sunlight shining, (detailed) (intricate) (8k) (HDR) (cinematic "
        "lighting) (sharp focus)",
        _QUALITY_NEGATIVE,
    ),
    "Vibrant Color": Style(
        "vibrant colorful, ink sketch|vector|2d colors, at nightfall, sharp focus, {prompt}, highly detailed, "
        "sharp focus, the clouds,colorful,ultra sharpness",
        _QUALITY_NEGATIVE,
    ),
    "Snow": Style(
        "cinema 4d render, {prompt}, high contrast, vibrant and saturated, sico style, surrounded by magical "
        "glow,floating ice shards, snow crystals, cold, windy background, frozen natural landscape in background"
        "  cinematic atmosphere,highly detailed, sharp focus, intricate design, 3d, unreal engine, octane "
        "render, CG best quality, highres, photorealistic, dramatic lighting, artstation, concept art, cinematic, "
        "epic Steven Spielberg movie still, sharp focus, smoke, sparks, art by pascal blanche and greg rutkowski "
        "and repin, trending on artstation, hyperrealism painting, matte painting, 4k resolution",
        _QUALITY_NEGATIVE,
    ),
    "Line art": Style(
        "line art drawing {prompt} . professional, sleek, modern, minimalist, graphic, line art, vector graphics",
        "anime, photorealistic, 35mm film, deformed, glitch, blurry, noisy, off-center, deformed, cross-eyed, "
        "closed eyes, bad anatomy, ugly, disfigured, mutated, realism, realistic, impressionism, expressionism, "
        "oil, acrylic",
    ),
}

DEFAULT_STYLE = "No style"


def apply_style(name: str, prompt: str, negative: str = "") -> tuple[str, str]:
    """Fill the style's template with `prompt`; the style's negative goes before the user's negative."""
    key = name.strip("()") if name not in STYLES else name  # the official demo spells it "(No style)"
    if key not in STYLES:
        raise ValueError(f"unknown style {name!r}; choose one of: {', '.join(STYLES)}")
    style = STYLES[key]
    return style.prompt.replace("{prompt}", prompt), f"{style.negative} {negative}".strip()
