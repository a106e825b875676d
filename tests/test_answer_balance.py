"""--balance-answers: the sampling weights that even out each question text's answers, the
weighted epoch sampler they drive (deterministic, resumable), and a stage-2 run that uses them."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from mmfusion.config import ConfigError
from mmfusion.training.data import (
    EpochSampler,
    WeightedEpochSampler,
    answer_balance_weights,
    main_answer,
    rarest_answer_share,
)

# "is there a red shape?" answered "no" 7 times in 8, as in easy-VQA; one open question; two free-form ones.
QUESTIONS = ["is there a red shape?"] * 8 + ["what color is it?"] * 4 + ["how old is the man?", "why?"]
ANSWERS = [["no"]] * 7 + [["yes"]] + [["red"], ["red"], ["red"], ["blue"]] + [["ten", "10", "10"], "because"]


def shares(weights: torch.Tensor, question: str) -> dict[str, float]:
    rows = [i for i, q in enumerate(QUESTIONS) if q == question]
    total = float(weights[rows].sum())
    out: Counter = Counter()
    for i in rows:
        out[main_answer(ANSWERS[i])] += float(weights[i]) / total
    return dict(out)


def test_strength_zero_keeps_the_data_and_one_evens_the_answers_per_question():
    assert torch.equal(answer_balance_weights(QUESTIONS, ANSWERS, 0.0), torch.ones(len(QUESTIONS), dtype=torch.float64))
    w = answer_balance_weights(QUESTIONS, ANSWERS, 1.0)
    assert shares(w, "is there a red shape?") == pytest.approx({"no": 0.5, "yes": 0.5})
    assert shares(w, "what color is it?") == pytest.approx({"red": 0.5, "blue": 0.5})
    assert float(w[7]) == pytest.approx(4.0) and float(w[0]) == pytest.approx(8 / 14)  # the rare "yes" drawn 4x
    # every question text keeps its share of the epoch; a question asked once keeps weight 1
    for q in set(QUESTIONS):
        assert float(w[[i for i, x in enumerate(QUESTIONS) if x == q]].sum()) == pytest.approx(QUESTIONS.count(q))
    assert w[-2:].tolist() == [1.0, 1.0]
    # the run's summary line: the rarest answer's share of its question's draws, median over texts
    assert rarest_answer_share(QUESTIONS, ANSWERS) == pytest.approx(1 / 4)  # texts: 1/8 and 1/4
    assert rarest_answer_share(QUESTIONS, ANSWERS, w) == pytest.approx(1 / 2)
    assert rarest_answer_share(["why?", "how?"], ["a", "b"]) is None


def test_partial_strength_lies_between_and_question_text_is_normalized():
    half = shares(answer_balance_weights(QUESTIONS, ANSWERS, 0.5), "is there a red shape?")
    # yes weight ~ 8^0.5 / (7^0.5 + 1) of the data's: 1/8 -> 0.274
    assert half["yes"] == pytest.approx(1 / (1 + 7 ** 0.5)) and 1 / 8 < half["yes"] < 0.5
    spaced = ["Is there a RED shape? "] + QUESTIONS[1:]
    assert torch.equal(answer_balance_weights(spaced, ANSWERS, 1.0), answer_balance_weights(QUESTIONS, ANSWERS, 1.0))
    assert main_answer(["ten", "10", "10"]) == "10" and main_answer("because") == "because"


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan")])
def test_strength_outside_zero_one_is_refused(strength):
    with pytest.raises(ConfigError, match="strength must be in"):
        answer_balance_weights(QUESTIONS, ANSWERS, strength)


def test_weighted_sampler_is_a_pure_function_of_seed_and_epoch():
    w = answer_balance_weights(QUESTIONS, ANSWERS, 1.0)
    a, b = WeightedEpochSampler(w, seed=3), WeightedEpochSampler(w, seed=3)
    first = list(a)
    assert first == list(b) and len(first) == len(a) == len(QUESTIONS)
    a.set_epoch(2)
    second = list(a)
    assert second != first and all(2 * 14 <= v < 3 * 14 for v in second)  # virtual indices of epoch 2
    b.set_epoch(2)
    assert list(b) == second  # a resumed run replays epoch 2 exactly
    assert list(WeightedEpochSampler(w, seed=4)) != first


def test_weighted_sampler_draws_rows_in_proportion_to_their_weights():
    w = answer_balance_weights(QUESTIONS, ANSWERS, 1.0)
    sampler = WeightedEpochSampler(w, seed=0)
    counts: Counter = Counter()
    for epoch in range(400):
        sampler.set_epoch(epoch)
        counts.update(v - epoch * len(w) for v in sampler)
    drawn = torch.tensor([counts[i] for i in range(len(w))], dtype=torch.float64) / 400
    assert torch.allclose(drawn, w, atol=0.25), (drawn, w)  # the rare "yes" ~4 draws per epoch, each "no" ~0.57
    plain = EpochSampler(len(w), seed=0)
    assert sorted(plain) == list(range(len(w)))  # the unweighted sampler: a permutation


@pytest.fixture(scope="module")
def skewed_vqa(tmp_path_factory):
    """24 images, the question "is it red?" answered "yes" for 3 of them."""
    from PIL import Image

    root = tmp_path_factory.mktemp("skewed")
    (root / "images").mkdir()
    with open(root / "data.jsonl", "w") as f:
        for i in range(24):
            color = (200, 30, 30) if i < 3 else (30, 30, 200)
            Image.new("RGB", (16, 16), color).save(root / "images" / f"{i}.png")
            f.write(json.dumps({"image": f"images/{i}.png", "question": "is it red?",
                                "answers": ["yes" if i < 3 else "no"]}) + "\n")
    return root / "data.jsonl"


@pytest.mark.slow
def test_stage_two_with_balanced_answers_logs_records_and_resumes_exactly(skewed_vqa, tmp_path):
    from test_training import QUIET, train_here, weights

    from mmfusion import ViT, ViTConfig

    torch.manual_seed(0)
    vit = tmp_path / "vit"
    ViT(ViTConfig(image_size=16, patch_size=4, n_layer=2, n_head=2, n_embd=32, num_classes=2)).save_pretrained(vit)
    args = ["--dataset", str(skewed_vqa), "--train-split", "train", "--eval-split", "train", "--holdout", "0",
            "--vit", str(vit), "--gpt", "gpt-tiny", "--block-size", "64", "--batch-size", "4",
            "--warmup-steps", "2", "--max-new-tokens", "2", "--balance-answers", "1", "--max-steps", "8", *QUIET]
    log = train_here("train_vqa", [*args, "--output-dir", str(tmp_path / "full"), "--save-every", "4"])
    assert ("answers balanced within each question text (--balance-answers 1): a text's rarest answer gets "
            "50.0% of its draws, not 12.5%") in log, log
    config = json.loads((tmp_path / "full" / "run_config.json").read_text())
    assert config["stage"]["balance_answers"] == 1.0
    train_here("train_vqa", [*args, "--output-dir", str(tmp_path / "resumed"),
                             "--resume", str(tmp_path / "full" / "checkpoints" / "step_4")])
    a, b = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a), "resume under weighted sampling differs"


class Printer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, line: str) -> None:
        self.lines.append(line)


def stage_rows(questions: list[str], answers: list):
    import datasets

    return datasets.Dataset.from_dict({"question": questions, "answers": [[a] if isinstance(a, str) else a
                                                                          for a in answers]})


def test_stage_two_weights_say_what_they_change_and_step_aside_where_they_cannot_apply():
    from mmfusion.training.train_vqa import VQAStageConfig, sampling_weights

    rows, captions = stage_rows(QUESTIONS, ANSWERS), list(range(5))
    out = Printer()
    w = sampling_weights(out, VQAStageConfig(balance_answers=1.0, task="both"), rows, captions)
    assert len(w) == len(QUESTIONS) + 5 and w[-5:].tolist() == [1.0] * 5  # captions keep their share
    assert "rarest answer gets 50.0% of its draws, not 25.0%" in out.lines[-1]
    assert sampling_weights(out, VQAStageConfig(balance_answers=0.0), rows, None) is None
    assert sampling_weights(out, VQAStageConfig(balance_answers=0.5, turns=2), rows, None) is None
    assert "not conversations (--turns 2)" in out.lines[-1]
    free_form = stage_rows(["why?", "how old?", "what?"], ["because", "ten", "this"])
    assert sampling_weights(out, VQAStageConfig(), free_form, None) is None
    assert "changes nothing here (each question text's answers are already equally common, or it has one)" in \
        out.lines[-1]
    even = stage_rows(["is it red?"] * 3, ["yes", "no", "maybe"])  # it said "no text has more than one answer"
    assert sampling_weights(out, VQAStageConfig(), even, None) is None and "equally common" in out.lines[-1]
    assert VQAStageConfig().balance_answers == 0.5  # the main job's recipe
