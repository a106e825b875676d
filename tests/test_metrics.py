"""Metrics: official VQA answer normalization, leave-one-out VQA score, top-1 accuracy.

Every expected value below was worked out by hand from the rules in the VQA
challenge's evaluation script, as restated in `mmfusion.metrics`.
"""

import random

import numpy as np
import pytest
import torch

from mmfusion.metrics import normalize_answer, top1_accuracy, vqa_accuracy, vqa_score


@pytest.mark.parametrize("raw, expected", [
    # number words become digits; case folds
    ("Two", "2"), ("none", "0"), ("ZERO", "0"), ("ten", "10"), ("eleven", "eleven"),
    # articles are dropped, alone too
    ("the dog", "dog"), ("A dog", "dog"), ("an apple", "apple"), ("a", ""), ("the", ""),
    # contractions regain their apostrophe; apostrophes themselves are never stripped
    ("dont", "don't"), ("isnt", "isn't"), ("Dont know", "don't know"), ("couldnt've", "couldn't've"),
    ("couldn'tve", "couldn't've"), ("couldntve", "couldntve"), ("it's", "it's"), ("twas", "'twas"),
    # periods: deleted unless a digit follows
    ("yes.", "yes"), ("e.g.", "eg"), ("3.5", "3.5"), ("2.", "2"),
    # a comma between digits switches every mark to deletion
    ("1,000", "1000"), ("1,000 (about)", "1000 about"), ("10,000!", "10000"),
    # otherwise a mark touching a space is deleted, one that does not becomes a space
    ("red!", "red"), ("red, blue", "red blue"), ("red,blue", "red blue"), ("x-ray", "x ray"),
    ("what?", "what"), ("(left)", "left"), ("left / right", "left right"), ("a, b", "b"),
    # marks outside the official list stay
    ("10:30", "10:30"), ("50%", "50%"), ("#1", "#1"),
    # whitespace: newlines and tabs are spaces, runs collapse, ends are stripped
    ("  many   spaces ", "many spaces"), ("line\nbreak\ttab", "line break tab"), ("", ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def _ten(matching: int, answer: str = "2") -> list[str]:
    others = ["1", "3", "4", "5", "6", "7", "8", "9", "10", "11"]
    return [answer] * matching + others[: 10 - matching]


@pytest.mark.parametrize("matching, expected", [
    (0, 0.0),
    (1, 0.3),  # (1 * 0 + 9 * 1/3) / 10
    (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
    (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10
    (4, 1.0),  # every subset of 9 keeps at least 3 matches
    (10, 1.0),
])
def test_vqa_score_ten_answers(matching, expected):
    assert vqa_score("2", _ten(matching)) == pytest.approx(expected)


def test_vqa_score_normalizes_both_sides():
    assert vqa_score("Two.", _ten(3, "two")) == pytest.approx(0.9)
    assert vqa_score("the dog", ["Dog"] * 10) == 1.0


def test_vqa_score_one_answer_is_exact_match():
    assert vqa_score("Yes.", ["yes"]) == 1.0
    assert vqa_score("no", ["yes"]) == 0.0


def test_vqa_score_few_answers_uses_leave_one_out():
    # With n answers the best possible score is min(1, (n - 1) / 3).
    assert vqa_score("red", ["red", "red"]) == pytest.approx(1 / 3)
    assert vqa_score("red", ["red", "red", "red"]) == pytest.approx(2 / 3)
    assert vqa_score("red", ["red", "blue", "green"]) == pytest.approx(2 / 9)  # (0 + 1/3 + 1/3) / 3


def test_vqa_score_matches_official_loop():
    # The official loop, written naively: drop each answer in turn, count matches among the rest.
    rng = random.Random(0)
    for _ in range(200):
        n = rng.choice([2, 3, 5, 10])
        answers = [rng.choice(["a cat", "cat", "dog", "2", "two"]) for _ in range(n)]
        pred = rng.choice(["cat", "Two", "dog!"])
        norm = [normalize_answer(a) for a in answers]
        expected = sum(min(1, (norm[:i] + norm[i + 1:]).count(normalize_answer(pred)) / 3) for i in range(n)) / n
        assert vqa_score(pred, answers) == pytest.approx(expected)


def test_vqa_score_rejects_bad_answers():
    with pytest.raises(ValueError):
        vqa_score("x", [])
    with pytest.raises(TypeError):
        vqa_score("x", "x")


def test_vqa_accuracy_overall_and_per_type():
    result = vqa_accuracy(["yes", "2", "red", "no"], [["yes"], _ten(3), ["blue"], ["no"]],
                          ["yes/no", "number", "other", "yes/no"])
    assert result["count"] == 4
    assert result["accuracy"] == pytest.approx((1 + 0.9 + 0 + 1) / 4)
    assert result["per_type"] == {
        "number": {"accuracy": pytest.approx(0.9), "count": 1},
        "other": {"accuracy": 0.0, "count": 1},
        "yes/no": {"accuracy": 1.0, "count": 2},
    }
    assert vqa_accuracy(["a"], [["b"]])["per_type"] == {}


def test_vqa_accuracy_rejects_bad_input():
    with pytest.raises(ValueError):
        vqa_accuracy(["a", "b"], [["a"]])
    with pytest.raises(ValueError):
        vqa_accuracy(["a"], [["a"]], ["other", "other"])
    with pytest.raises(ValueError):
        vqa_accuracy([], [])


def test_top1_accuracy():
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 1])
    assert top1_accuracy(logits, labels) == 0.5
    assert top1_accuracy([1, 0, 0, 0], [1, 0, 0, 1]) == 0.75
    assert top1_accuracy(np.array([[0.0, 1.0]]), np.array([1])) == 1.0
    with pytest.raises(ValueError, match="shape"):
        top1_accuracy(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        top1_accuracy(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
