import pytest

from instantid_colab.styles import STYLES, apply_style


def test_the_nine_official_styles_in_demo_order():
    assert list(STYLES) == ["No style", "Watercolor", "Film Noir", "Neon", "Jungle", "Mars", "Vibrant Color",
                            "Snow", "Line art"]
    assert all("{prompt}" in style.prompt for style in STYLES.values())


def test_template_filled_and_style_negative_goes_first():
    prompt, negative = apply_style("Watercolor", "a woman", "hands")
    assert prompt == "watercolor painting, a woman. vibrant, beautiful, painterly, detailed, textural, artistic"
    assert negative.startswith("(lowres, low quality, worst quality:1.2), (text:1.2), watermark, anime")
    assert negative.endswith("low contrast, noisy hands")


def test_no_style_keeps_prompt_and_accepts_official_spelling():
    assert apply_style("No style", "a man", "blurry") == ("a man", "blurry")
    assert apply_style("(No style)", "a man") == ("a man", "")


def test_jungle_quotes_and_unknown_style_lists_choices():
    assert apply_style("Jungle", "a man")[0].startswith('waist-up "a man in a Jungle" by Syd Mead')
    with pytest.raises(ValueError, match="unknown style 'Cubism'.*Watercolor"):
        apply_style("Cubism", "a man")
