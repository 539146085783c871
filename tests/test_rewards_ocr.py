"""OCR reward: prompt parsing, edit distance and real tesseract on text rendered with PIL."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from tpgrpo.rewards import build_reward
from tpgrpo.rewards.ocr import edit_distance, normalize_text, ocr_score, ocr_target

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
HAVE_TESSERACT = shutil.which("tesseract") is not None


def _needs_tesseract():
    if HAVE_TESSERACT and os.path.exists(FONT):
        return
    if os.environ.get("CI"):
        pytest.fail("tesseract or DejaVuSans missing in CI: .ci/run must install tesseract-ocr tesseract-ocr-eng "
                    "fonts-dejavu-core")
    pytest.skip("tesseract binary or DejaVuSans font not installed (apt-get install tesseract-ocr "
                "tesseract-ocr-eng fonts-dejavu-core)")


def render(text: str, size=(768, 160), px=48) -> np.ndarray:
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).text((24, (size[1] - px) // 2), text, fill="black", font=ImageFont.truetype(FONT, px))
    return np.asarray(im)


@pytest.mark.parametrize("prompt, target", [
    ('a sign that says "Hello World"', "helloworld"),
    ('a poster "Summer  Sale 2024" and "second"', "summersale2024"),
    ("a neon sign reading \u201cOpen Late\u201d", "openlate"),
    ('"A\tB\nC"', "abc"),
])
def test_target_is_first_quoted_text_lowercased_without_spaces(prompt, target):
    assert ocr_target(prompt) == target


@pytest.mark.parametrize("prompt", ["a photo of a cat", 'an "unterminated quote', 'empty "  " quotes'])
def test_prompt_without_quoted_text_raises_naming_it(prompt):
    with pytest.raises(ValueError, match="ocr reward: prompt has (no|empty) quoted text"):
        ocr_target(prompt)


@pytest.mark.parametrize("a, b, d", [
    ("", "", 0), ("abc", "", 3), ("", "abc", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
    ("abc", "abc", 0), ("abc", "acb", 2), ("intention", "execution", 5),
])
def test_edit_distance(a, b, d):
    assert edit_distance(a, b) == d == edit_distance(b, a)


def test_score_formula():
    assert ocr_score("helloworld", "helloworld") == (1.0, 0)
    assert ocr_score("hellowor1d", "helloworld") == (0.9, 1)
    assert ocr_score("", "hello") == (0.0, 5)
    assert ocr_score("completely different text", "abc")[0] == 0.0  # distance capped at len(target)
    assert ocr_score("xxhelloxx", "hello", substring=True) == (1.0, 4)  # Flow-GRPO: containing the target is 1
    assert ocr_score("xxhelloxx", "hello", substring=False)[0] == pytest.approx(1 - 4 / 5)
    assert normalize_text(" Hello\tWorld \n") == "helloworld"


def test_tesseract_reads_rendered_text():
    _needs_tesseract()
    reward = build_reward("ocr")
    images = np.stack([render("Hello World"), render("Summer Sale"), render("Quiet River"), render("")])
    prompts = ['a sign that says "hello world"'] * 4
    out = reward(images, prompts)
    assert set(out) == {"ocr", "ocr_edit_distance"}
    assert out["ocr"].dtype == np.float64 and out["ocr"].shape == (4,)
    assert out["ocr"][0] == 1.0
    assert out["ocr"][1] < 0.5 and out["ocr"][2] < 0.5
    assert out["ocr"][3] == 0.0  # blank image: nothing recognised
    # the right text for each image scores 1
    right = reward(images[:3], ['"Hello World"', 'a poster with "Summer Sale"', '"quiet river" book cover'])
    np.testing.assert_array_equal(right["ocr"], [1.0, 1.0, 1.0])


def test_tesseract_partial_credit_and_workers():
    _needs_tesseract()
    reward = build_reward("ocr", workers=2, psm=7)
    out = reward(np.stack([render("HELLO WORLD"), render("HELLO")]), ['"hello world"', '"hello world"'])
    assert out["ocr"][0] == 1.0
    assert out["ocr"][1] == pytest.approx(0.5)  # "hello" vs "helloworld": 5 edits of 10


def test_ocr_reward_rejects_bad_input_clearly():
    _needs_tesseract()
    reward = build_reward("ocr")
    with pytest.raises(ValueError, match="no quoted text to render: 'a photo of a cat'"):
        reward.validate_prompts(['"ok"', "a photo of a cat"])
    with pytest.raises(ValueError, match="no quoted text"):
        reward(render("x")[None], ["a photo of a cat"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(np.stack([render("a"), render("b")]), ['"a"'])
    with pytest.raises(ValueError, match="backend must be"):
        build_reward("ocr", backend="easyocr")
    with pytest.raises(ValueError, match="not found on PATH"):
        build_reward("ocr", tesseract_cmd="/nonexistent/tesseract")
    with pytest.raises(ValueError, match="no language 'klingon'"):
        build_reward("ocr", lang="klingon")


def test_paddle_backend_missing_is_a_clear_error():
    try:
        import paddleocr  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the optional paddleocr package"):
            build_reward("ocr", backend="paddle")
    else:
        pytest.skip("paddleocr is installed")
