"""The procedural scenes dataset: deterministic, split by seed, and its images, captions and
answers agree with each other."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from mmfusion.data import DatasetError, load_caption_dataset, load_vqa_dataset
from mmfusion.data import scenes as sc
from mmfusion.metrics import caption_metrics, normalize_caption, token_f1


def _center(s: sc.Shape) -> tuple[int, int]:
    row, col = divmod(s.cell, 2)
    return round(16 + 32 * col + s.dx), round(16 + 32 * row + s.dy)


def test_scenes_are_a_pure_function_of_seed_and_index():
    a = [sc.make_scene(3, i) for i in range(50)]
    b = [sc.make_scene(3, i) for i in reversed(range(50))][::-1]  # order of making does not matter
    assert a == b
    assert np.array_equal(np.asarray(sc.render(a[7])), np.asarray(sc.render(b[7])))
    assert [sc.questions(s, 3) for s in a] == [sc.questions(s, 3) for s in b]
    # The first N scenes do not depend on N.
    assert sc.load_scenes_captions("test", 5)["caption"] == sc.load_scenes_captions("test", 20)["caption"][:5]


def test_train_and_test_come_from_different_seeds():
    train = sc.load_scenes_captions("train", 200)
    test = sc.load_scenes_captions("test", 200)
    assert sc.SPLIT_SEEDS["train"] != sc.SPLIT_SEEDS["test"]
    same = sum(a == b for a, b in zip(train["caption"], test["caption"]))
    assert same < 10  # only one-shape scenes can coincide by chance
    assert train[0]["image"].tobytes() != test[0]["image"].tobytes()


def test_scene_statistics_cover_every_attribute():
    scenes = [sc.make_scene(sc.SPLIT_SEEDS["train"], i) for i in range(500)]
    counts = Counter(len(s.shapes) for s in scenes)
    assert set(counts) == {1, 2, 3, 4} and min(counts.values()) > 80
    shapes = [x for s in scenes for x in s.shapes]
    assert {x.color for x in shapes} == set(sc.COLORS)
    assert {x.shape for x in shapes} == set(sc.SHAPES)
    assert {x.size for x in shapes} == set(sc.SIZES)
    assert {x.position for x in shapes} == set(sc.POSITIONS)
    for s in scenes:
        cells = [x.cell for x in s.shapes]
        assert cells == sorted(set(cells))  # one shape per cell, reading order


@pytest.mark.parametrize("index", range(40))
def test_image_shows_what_the_caption_says(index):
    scene = sc.make_scene(11, index)
    image = np.asarray(sc.render(scene)).astype(int)
    assert image.shape == (64, 64, 3)
    for s in scene.shapes:
        x, y = _center(s)
        assert np.abs(image[y, x] - sc.COLORS[s.color]).max() <= 2, (s, image[y, x])
        # a large shape fills more pixels of its color than a small one could
        filled = (np.abs(image - sc.COLORS[s.color]).max(axis=-1) <= 2)
        box = filled[max(0, y - 12):y + 13, max(0, x - 12):x + 13].sum()
        assert box > 150 if s.size == "large" else box < 150
    occupied = {s.cell for s in scene.shapes}
    for cell in set(range(4)) - occupied:  # an empty cell is all background
        row, col = divmod(cell, 2)
        patch = image[32 * row:32 * row + 32, 32 * col:32 * col + 32]
        assert np.abs(patch - scene.background).max() <= 1
    text = sc.caption(scene)
    assert text.count(" at the ") == len(scene.shapes)
    for s in scene.shapes:
        assert f"a {s.size} {s.color} {s.shape} at the {s.position}" in text


def test_caption_grammar():
    shape = sc.Shape("red", "circle", "large", 0, 0.0, 0.0)
    other = sc.Shape("blue", "triangle", "small", 3, 0.0, 0.0)
    third = sc.Shape("green", "square", "small", 1, 0.0, 0.0)
    bg = (250, 250, 250)
    assert sc.caption(sc.Scene((shape,), bg)) == "a large red circle at the top left"
    assert sc.caption(sc.Scene((shape, other), bg)) == \
        "a large red circle at the top left and a small blue triangle at the bottom right"
    assert sc.caption(sc.Scene((shape, third, other), bg)) == ("a large red circle at the top left, a small green "
                                                                "square at the top right and a small blue triangle "
                                                                "at the bottom right")


def test_answers_are_true_of_the_scene():
    for index in range(300):
        scene = sc.make_scene(5, index)
        qs = sc.questions(scene, 5)
        assert len(qs) == sc.QUESTIONS_PER_SCENE and len({q for q, _, _ in qs}) == len(qs)
        by_pos = {s.position: s for s in scene.shapes}
        names = [s.name for s in scene.shapes]
        for q, a, kind in qs:
            assert kind == ("yes/no" if a in ("yes", "no") else "number" if q.startswith("how many") else "other")
            if q == "how many shapes are there?":
                assert a == sc._NUMBERS[len(scene.shapes)]
            elif q.startswith("how many "):
                color = q.split()[2]
                assert a == sc._NUMBERS[sum(s.color == color for s in scene.shapes)]
            elif q.startswith("what color is the shape at the "):
                assert a == by_pos[q[len("what color is the shape at the "):-1]].color
            elif q.startswith("what shape is at the "):
                assert a == by_pos[q[len("what shape is at the "):-1]].shape
            elif q.startswith("is there a shape at the "):
                assert a == ("yes" if q[len("is there a shape at the "):-1] in by_pos else "no")
            elif q.startswith("is there a "):
                words = q[len("is there a "):-1].split()
                hit = words[0] in [s.shape for s in scene.shapes] if len(words) == 1 else " ".join(words) in names
                assert a == ("yes" if hit else "no")
            elif q.startswith("where is the "):
                name = q[len("where is the "):-1]
                assert names.count(name) == 1 and a == scene.shapes[names.index(name)].position
            elif q.endswith(" large or small?"):
                name = q[len("is the "):-len(" large or small?")]
                assert names.count(name) == 1 and a == scene.shapes[names.index(name)].size
            else:
                raise AssertionError(f"unexpected question {q!r}")


def test_answers_are_balanced_enough():
    ds = sc.load_scenes_vqa("train", 500)
    answers = Counter(a[0] for a in ds["answers"])
    assert 0.35 < answers["no"] / (answers["yes"] + answers["no"]) < 0.65
    assert set(Counter(ds["answer_type"])) == {"yes/no", "number", "other"}


def test_loaders_through_the_dispatchers():
    vqa, report = load_vqa_dataset("scenes", "test")
    assert len(vqa) == sc.SPLIT_SIZES["test"] * sc.QUESTIONS_PER_SCENE and report.kept == len(vqa)
    assert set(vqa.column_names) == {"image", "question", "answers", "answer_type", "image_id"}
    caps, _ = load_caption_dataset("scenes", "test")
    assert len(caps) == sc.SPLIT_SIZES["test"]
    row = caps[3]
    assert row["image"].size == (64, 64) and row["captions"] == [sc.caption(sc.make_scene(sc.SPLIT_SEEDS["test"], 3))]
    png = np.asarray(Image.open(io.BytesIO(caps.with_format(None).data.column("image")[3]["bytes"].as_py())))
    assert np.array_equal(png, np.asarray(sc.render(sc.make_scene(sc.SPLIT_SEEDS["test"], 3))))


@pytest.mark.parametrize("call", [
    lambda: sc.load_scenes_vqa("validation"),
    lambda: sc.load_scenes_captions("train", 0),
    lambda: load_caption_dataset("easy-vqa", "test"),
    lambda: load_vqa_dataset("scenes", "test", question_column="q"),
])
def test_bad_requests_are_clear_errors(call):
    with pytest.raises(DatasetError):
        call()


def test_caption_metrics_by_hand():
    assert normalize_caption("A Large red circle, at the TOP left.") == "large red circle at top left"
    # pred words {red, circle, at, top} vs ref {red, circle, at, top, left}: P = 1, R = 4/5
    assert token_f1("a red circle at the top", "a red circle at the top left") == pytest.approx(2 * 0.8 / 1.8)
    # repeated words count as a multiset: pred "red red" vs ref "red blue": common 1, P = R = 1/2
    assert token_f1("red red", "red blue") == pytest.approx(0.5)
    assert token_f1("", "") == 1.0 and token_f1("", "red") == 0.0 and token_f1("blue", "red") == 0.0
    m = caption_metrics(["a red circle at the top left", "a blue square"], ["a red circle at the top left.", "a red square"])
    assert m["count"] == 2 and m["exact_match"] == 0.5
    assert m["token_f1"] == pytest.approx((1.0 + 0.5) / 2)
    with pytest.raises(ValueError):
        caption_metrics(["a"], [])


def test_image_processor_takes_a_datasets_column():
    from mmfusion.processing import ImageProcessor

    caps = sc.load_scenes_captions("test", 3)
    x = ImageProcessor(64, (0.5,) * 3, (0.5,) * 3)(caps["image"])  # a Column in datasets 4+, a list before
    assert x.shape == (3, 3, 64, 64)
    assert torch.equal(x[1], ImageProcessor(64, (0.5,) * 3, (0.5,) * 3)(caps[1]["image"])[0])


def test_question_template_names_the_question_kind():
    assert sc.question_template("is there a red circle?") == "is there a C S?"
    assert sc.question_template("what color is the shape at the bottom right?") == "what color is the shape at the P?"
    assert sc.question_template("how many black shapes are there?") == "how many C shapes are there?"
    assert sc.question_template("is the blue triangle large or small?") == "is the C S large or small?"
    # every generated question maps to one of the 9 templates; words inside other words stay
    seed = sc.SPLIT_SEEDS["train"]
    templates = {sc.question_template(q) for i in range(200) for q, _, _ in sc.questions(sc.make_scene(seed, i), seed)}
    assert len(templates) == 9 and all("red" not in t and "circle" not in t for t in templates)
    assert sc.question_template("is the reddish squares' top leftover?") == "is the reddish squares' top leftover?"


def test_captions_in_any_order_keep_the_phrases_and_draw_the_share():
    scenes = [sc.make_scene(sc.SPLIT_SEEDS["train"], i) for i in range(400)]
    texts = [sc.caption(s) for s in scenes]
    phrases = [sorted(sc.caption_in_any_order(t, s.index, 1.0).replace(" and ", ", ").split(", ")) for t, s in
               zip(texts, scenes)]
    assert phrases == [sorted(t.replace(" and ", ", ").split(", ")) for t in texts]  # the same shapes, reordered
    assert all(sc.caption_in_any_order(t, s.index, 0.0) == t for t, s in zip(texts, scenes))
    several = [(t, s.index) for t, s in zip(texts, scenes) if len(s.shapes) > 1]
    moved = {share: sum(sc.caption_in_any_order(t, i, share) != t for t, i in several) / len(several)
             for share in (0.5, 1.0)}
    # a drawn permutation is reading order again 1 time in n! (2 shapes: half the time)
    assert 0.65 < moved[1.0] < 0.95 and 0.3 * moved[1.0] < moved[0.5] < 0.7 * moved[1.0]
    # the same scenes every time, from the scene index alone
    assert [sc.caption_in_any_order(t, i, 0.5) for t, i in several] == [
        sc.caption_in_any_order(t, i, 0.5) for t, i in several]
    for text in ("a dog on a beach", "a small red circle at the left and a cat"):
        with pytest.raises(DatasetError, match="not a scenes caption"):
            sc.caption_in_any_order(text, 0, 1.0)
