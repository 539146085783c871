"""The shapes world (docs/design.md §6): grammar and split, exact renderer, detector and GenEval-style scorer."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from tpgrpo.shapes.detect import detect, score_detections, score_image
from tpgrpo.shapes.grammar import (BACKGROUND, PALETTE, TAGS, all_prompts, eval_set, parse_prompt, split_prompts,
                                   vocabulary)
from tpgrpo.shapes.render import CANVAS, SceneObject, render, render_prompt, sample_scene, shape_mask

TEST = split_prompts("test")
TRAIN = split_prompts("train")
_EIGHT = np.ones((3, 3), dtype=bool)


def _score(objects: list[SceneObject], text: str):
    return score_image(render(objects), parse_prompt(text))


# --- ground truth -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2, 7, 12345])
def test_ground_truth_renders_score_one_on_test_split(seed):
    for spec in TEST:
        s = score_image(render_prompt(spec, seed), spec)
        assert (s.strict, s.partial) == (1.0, 1.0), (spec.text, seed, s)


def test_ground_truth_renders_score_one_on_train_sample():
    rng = random.Random(0)
    for spec in rng.sample(TRAIN, 60):
        seed = rng.randrange(10**6)
        s = score_image(render_prompt(spec, seed), spec)
        assert (s.strict, s.partial) == (1.0, 1.0), (spec.text, seed, s)


def test_render_is_exact_and_scenes_are_valid():
    spec = parse_prompt("a circle left of a square")
    assert np.array_equal(render_prompt(spec, 3), render_prompt(spec, 3))
    img = render([])
    assert img.shape == (CANVAS, CANVAS, 3) and img.dtype == np.uint8 and (img == BACKGROUND).all()
    for seed in range(20):
        objs = sample_scene(parse_prompt("four triangles"), random.Random(seed))
        assert len(objs) == 4 and all(o.shape == "triangle" for o in objs)
        assert all(0 <= o.x <= CANVAS - o.size and 0 <= o.y <= CANVAS - o.size for o in objs)


# --- train / test split -------------------------------------------------------------------------------------------

def test_split_sizes_and_tags_are_fixed():
    assert len(all_prompts()) == 243
    assert len(TEST) == 56 and len(TRAIN) == 190
    assert Counter(p.tag for p in TEST) == {"single_object": 3, "two_object": 2, "counting": 3, "colors": 6,
                                            "position": 6, "color_attr": 36}
    assert Counter(p.tag for p in TRAIN) == {"single_object": 3, "two_object": 4, "counting": 9, "colors": 12,
                                             "position": 18, "color_attr": 144}
    for tag in TAGS:
        assert any(p.tag == tag for p in TEST) and any(p.tag == tag for p in TRAIN), tag


def test_split_is_disjoint_except_single_objects_and_covers_the_grammar():
    test, train = {p.text for p in TEST}, {p.text for p in TRAIN}
    assert test & train == {"a circle", "a square", "a triangle"}
    assert {p.tag for p in TEST if p.text in train} == {"single_object"}
    assert test | train == {p.text for p in all_prompts()}
    assert len({p.text for p in all_prompts()}) == len(all_prompts())  # every prompt text is unique


def test_split_is_stable():
    texts = sorted(p.text for p in TEST)
    assert hashlib.sha256("\n".join(texts).encode()).hexdigest() == \
        "f95c2bf23de80db86666f0cdd358b103a9a80c3704913c6a8e2ded58f3fdebb2"
    for text in ["four circles", "two squares", "three triangles", "a circle left of a square",
                 "a triangle right of a square", "a cyan circle", "a red circle and a green square"]:
        assert text in texts
    assert [p.text for p in split_prompts("test")] == [p.text for p in TEST]
    with pytest.raises(ValueError, match="split"):
        split_prompts("validation")


def test_eval_set_is_balanced_and_deterministic():
    items = eval_set(5)
    assert len(items) == 5 * len(TAGS)
    assert Counter(it.prompt.tag for it in items) == {t: 5 for t in TAGS}
    assert len({it.seed for it in items}) == len(items)
    test_texts = {p.text for p in TEST}
    assert all(it.prompt.text in test_texts for it in items)
    again = eval_set(5)
    assert [(it.prompt.text, it.seed) for it in items] == [(it.prompt.text, it.seed) for it in again]
    # cycling: a tag with fewer prompts than per_tag repeats them in order
    single = [it.prompt.text for it in items if it.prompt.tag == "single_object"]
    assert single == ["a circle", "a square", "a triangle", "a circle", "a square"]
    # a different eval seed changes the seeds (and the colour-attribution sample), not the balance
    other = eval_set(5, seed=1)
    assert {it.seed for it in other}.isdisjoint({it.seed for it in items})


# --- exact counts -------------------------------------------------------------------------------------------------

def _row(shape: str, n: int, color: str = "red", y: int = 2) -> list[SceneObject]:
    return [SceneObject(shape, color, 1 + 11 * (k % 3), y + 11 * (k // 3)) for k in range(n)]


def test_too_many_objects():
    s = _score(_row("circle", 3), "two circles")
    assert s.strict == 0.0 and s.partial == pytest.approx(1 - 1 / 2)
    s = _score(_row("circle", 2), "a circle")
    assert s.strict == 0.0 and s.partial == 0.0  # 1 − |1 − 2| / 1


def test_too_few_objects():
    s = _score(_row("square", 1), "four squares")
    assert s.strict == 0.0 and s.partial == pytest.approx(0.25)
    s = _score(_row("triangle", 2), "three triangles")
    assert s.strict == 0.0 and s.partial == pytest.approx(2 / 3)


def test_no_objects_scores_zero():
    for spec in TEST:
        assert score_image(render([]), spec) == score_image(render([]), spec)
        s = score_image(render([]), spec)
        assert (s.strict, s.partial) == (0.0, 0.0), spec.text


def test_exact_count_and_unnamed_shapes_are_ignored():
    assert _score(_row("circle", 4), "four circles").strict == 1.0
    objs = [SceneObject("circle", "red", 2, 2), SceneObject("square", "blue", 18, 18)]
    s = _score(objs, "a circle")
    assert (s.strict, s.partial) == (1.0, 1.0)


# --- colours ------------------------------------------------------------------------------------------------------

def test_wrong_colour():
    s = _score([SceneObject("circle", "blue", 10, 10)], "a red circle")
    assert s.strict == 0.0 and s.partial == pytest.approx(0.5)  # count credit 1, colour credit 0
    s = _score([SceneObject("circle", "red", 10, 10)], "a red circle")
    assert (s.strict, s.partial) == (1.0, 1.0)


def test_colour_attribution_swapped():
    right = [SceneObject("circle", "red", 2, 2), SceneObject("square", "blue", 18, 18)]
    swapped = [SceneObject("circle", "blue", 2, 2), SceneObject("square", "red", 18, 18)]
    assert _score(right, "a red circle and a blue square") == _score(right, "a red circle and a blue square")
    s = _score(right, "a red circle and a blue square")
    assert (s.strict, s.partial) == (1.0, 1.0)
    s = _score(swapped, "a red circle and a blue square")
    assert s.strict == 0.0 and s.partial == pytest.approx(0.5)


def test_colour_credit_is_a_fraction():
    objs = [SceneObject("circle", "red", 2, 2), SceneObject("circle", "blue", 18, 18)]
    spec = parse_prompt("a red circle")
    s = score_image(render(objs), spec)
    # count credit 1 − |1 − 2| / 1 = 0, colour credit 1/2
    assert s.strict == 0.0 and s.partial == pytest.approx(0.25)


# --- position -----------------------------------------------------------------------------------------------------

def test_position_wrong_side():
    circle_right = [SceneObject("circle", "red", 20, 11), SceneObject("square", "blue", 2, 11)]
    s = _score(circle_right, "a circle left of a square")
    # clause A = mean(count 1, position 0) = 0.5, clause B = 1 → 0.75
    assert s.strict == 0.0 and s.partial == pytest.approx(0.75)
    s = _score(circle_right, "a circle right of a square")
    assert (s.strict, s.partial) == (1.0, 1.0)


def test_position_vertical_uses_image_rows():
    circle_top = [SceneObject("circle", "green", 11, 1), SceneObject("square", "cyan", 11, 20)]
    assert _score(circle_top, "a circle above a square").strict == 1.0
    assert _score(circle_top, "a square below a circle").strict == 1.0
    assert _score(circle_top, "a circle below a square").strict == 0.0
    # side by side at the same height: neither above nor below
    level = [SceneObject("circle", "green", 2, 11), SceneObject("square", "cyan", 20, 11)]
    assert _score(level, "a circle above a square").strict == 0.0
    assert _score(level, "a circle below a square").strict == 0.0


def test_position_with_a_missing_object():
    s = _score([SceneObject("circle", "red", 2, 11)], "a circle left of a square")
    # clause A = mean(1, 0) = 0.5, clause B = count 0 → 0.25
    assert s.strict == 0.0 and s.partial == pytest.approx(0.25)


# --- blobs --------------------------------------------------------------------------------------------------------

def test_touching_same_colour_squares_are_not_two_squares():
    for b in (SceneObject("square", "red", 12, 5), SceneObject("square", "red", 12, 15),
              SceneObject("square", "red", 7, 12)):
        objs = [SceneObject("square", "red", 2, 5), b]
        dets = detect(render(objs))
        assert sum(d.shape == "square" for d in dets) < 2, (b, dets)
        assert _score(objs, "two squares").strict == 0.0
    side_by_side = detect(render([SceneObject("square", "red", 2, 5), SceneObject("square", "red", 12, 5)]))
    assert [d.shape for d in side_by_side] == ["blob"]
    assert _score([SceneObject("square", "red", 2, 5), SceneObject("square", "red", 12, 5)], "a square").partial == 0


def test_touching_different_colour_squares_are_two_squares():
    objs = [SceneObject("square", "red", 2, 5), SceneObject("square", "blue", 12, 5)]
    assert sorted(d.color for d in detect(render(objs)) if d.shape == "square") == ["blue", "red"]
    assert _score(objs, "two squares").strict == 1.0


def test_detections_describe_the_objects():
    objs = [SceneObject("triangle", "yellow", 3, 4), SceneObject("circle", "purple", 18, 17)]
    dets = detect(render(objs))
    assert [(d.shape, d.color) for d in dets] == [("circle", "purple"), ("triangle", "yellow")]  # largest first
    circle = dets[0]
    assert circle.bbox == (18, 17, 28, 27)
    assert circle.center == pytest.approx((23.0, 22.0))
    assert circle.area == int(shape_mask("circle", 10).sum()) and circle.iou == pytest.approx(1.0)


# --- noise and determinism ----------------------------------------------------------------------------------------

def _noise_images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1234)
    images = []
    for k in range(n):
        if k % 2 == 0:
            images.append(rng.integers(0, 256, (CANVAS, CANVAS, 3), dtype=np.uint8))
        else:
            std = (10, 20, 40, 60, 80)[(k // 2) % 5]
            images.append(np.clip(np.round(rng.normal(128, std, (CANVAS, CANVAS, 3))), 0, 255).astype(np.uint8))
    return images


def test_noise_scores_about_zero():
    partial, strict = [], []
    for img in _noise_images(100):
        dets = detect(img)
        for spec in TEST:
            s = score_detections(dets, spec)
            partial.append(s.partial)
            strict.append(s.strict)
    assert max(strict) == 0.0
    assert np.mean(partial) < 0.1


def test_deterministic():
    images = [render_prompt(TEST[k], k) for k in range(0, len(TEST), 5)] + _noise_images(4)
    rng = np.random.default_rng(0)
    images.append(_perturb_noise(sample_scene(TEST[20], random.Random(0)), rng))
    for img in images:
        before = img.copy()
        assert detect(img) == detect(img)
        assert np.array_equal(img, before)  # the input is not modified
        for spec in TEST[::7]:
            assert score_image(img, spec) == score_image(img.copy(), spec)


def test_rejects_non_rgb_images():
    with pytest.raises(ValueError, match="RGB"):
        detect(np.zeros((32, 32), dtype=np.uint8))


# --- robustness to perturbed renders ------------------------------------------------------------------------------

def _masks(objs: list[SceneObject]) -> list[np.ndarray]:
    out = []
    for o in objs:
        m = np.zeros((CANVAS, CANVAS), dtype=bool)
        m[o.y:o.y + o.size, o.x:o.x + o.size] = shape_mask(o.shape, o.size)
        out.append(m)
    return out


def _paint(objs: list[SceneObject], masks: list[np.ndarray]) -> np.ndarray:
    img = np.empty((CANVAS, CANVAS, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for o, m in zip(objs, masks):
        img[m] = PALETTE[o.color]
    return img


def _perturb_noise(objs, rng, std=20.0):
    img = render(objs).astype(np.float64) + rng.normal(0.0, std, (CANVAS, CANVAS, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _perturb_ragged(objs, rng, frac=0.15):
    """~frac of each object's boundary pixels → background; ~frac of background pixels next to it → its colour."""
    masks = _masks(objs)
    img = _paint(objs, masks)
    occupied = np.logical_or.reduce(masks)
    for o, m in zip(objs, masks):
        boundary = m & ~ndimage.binary_erosion(m, _EIGHT)
        outside = ndimage.binary_dilation(m, _EIGHT) & ~occupied
        img[boundary & (rng.random(m.shape) < frac)] = BACKGROUND
        img[outside & (rng.random(m.shape) < frac)] = PALETTE[o.color]
    return img


def _perturb_dilate(objs, rng):
    return _paint(objs, [ndimage.binary_dilation(m, _EIGHT) for m in _masks(objs)])


def _perturb_erode(objs, rng):
    return _paint(objs, [ndimage.binary_erosion(m, _EIGHT) for m in _masks(objs)])


def test_masks_reproduce_the_renderer():
    for seed, spec in enumerate(TEST):
        objs = sample_scene(spec, random.Random(seed))
        assert np.array_equal(_paint(objs, _masks(objs)), render(objs))


@pytest.mark.parametrize("perturb", [_perturb_noise, _perturb_ragged, _perturb_dilate, _perturb_erode],
                         ids=["gaussian_noise", "ragged_edges", "dilate_1px", "erode_1px"])
def test_detector_is_robust_to_perturbations(perturb):
    rng = np.random.default_rng(0)
    strict, changed = [], 0
    for seed in range(3):
        for spec in TEST:
            objs = sample_scene(spec, random.Random(10_000 + seed))
            img = perturb(objs, rng)
            changed += not np.array_equal(img, render(objs))
            strict.append(score_image(img, spec).strict)
    assert changed == len(strict)  # the perturbation really perturbs
    assert np.mean(strict) >= 0.9, np.mean(strict)


# --- grammar and tokenizer ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "a pink circle", "a circle left of", "five circles", "two circle",
                                  "one circles", "a red circle and a red square", "a circle and a circle",
                                  "a big circle", "a circle left of a circle", "circles"])
def test_parse_prompt_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match="not in the shapes grammar"):
        parse_prompt(text)


def test_parse_prompt_normalises_case_and_spaces():
    spec = parse_prompt("  A  Red\tCircle ")
    assert spec.text == "a red circle" and spec.tag == "colors"
    assert spec.clauses[0].shape == "circle" and spec.clauses[0].color == "red" and spec.clauses[0].count == 1
    spec = parse_prompt("a triangle below a square")
    assert spec.tag == "position" and spec.relation == ("below", 0, 1)
    assert parse_prompt("three squares").clauses[0].count == 3
    for p in all_prompts():
        assert parse_prompt(p.text) == p


def test_tokenizer_rejects_unknown_words():
    from tpgrpo.models.toy import DEFAULT_CONFIG, ShapesTokenizer

    tok = ShapesTokenizer(vocabulary(), DEFAULT_CONFIG["max_words"])
    ids = tok([p.text for p in all_prompts()])
    assert ids.shape == (len(all_prompts()), DEFAULT_CONFIG["max_words"] + 1)
    with pytest.raises(ValueError, match="'pink'"):
        tok(["a pink circle"])
    with pytest.raises(ValueError, match="words"):
        tok(["a circle and a square and a triangle too"])
