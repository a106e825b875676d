"""What the loop feeds on: a deterministic epoch sampler (exact resume), per-example
generators for augmentation, the dataset views both stages train on, and which rows evaluate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.utils.data import Sampler

from ..config import check_number
from ..errors import ConfigError
from ..processing import PromptBuilder, majority_answer


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch from (seed, epoch) alone, so a resumed run replays the
    exact order of an uninterrupted one. accelerate shards its batches across processes.

    It yields *virtual* indices `epoch * n + i`: a dataset recovers the row with
    `split_index` and can seed per-example augmentation from (epoch, row), which makes
    augmentation independent of whatever else consumed the global RNG.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        offset = self.epoch * self.n
        if not self.shuffle:
            return iter(range(offset, offset + self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter((torch.randperm(self.n, generator=g) + offset).tolist())


class WeightedEpochSampler(EpochSampler):
    """EpochSampler's contract (virtual indices, a pure function of seed and epoch) for an epoch
    of n rows drawn with replacement in proportion to `weights`: rows a weight favours repeat,
    rows it disfavours may miss an epoch."""

    def __init__(self, weights: torch.Tensor, seed: int) -> None:
        super().__init__(len(weights), seed)
        self.weights = weights.double()

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        rows = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        return iter((rows + self.epoch * self.n).tolist())


def main_answer(answers) -> str:
    """The answer a row counts under for balancing: the most frequent of its references
    (the first among equals)."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    return max(answers, key=answers.count)


def _balance_keys(questions: list[str], answers: list) -> list[tuple[str, str]]:
    return [(" ".join(q.lower().split()), main_answer(a)) for q, a in zip(questions, answers, strict=True)]


def rarest_answer_share(questions: list[str], answers: list, weights: torch.Tensor | None = None) -> float | None:
    """The median, over question texts with more than one answer, of the share of a text's draws
    its rarest answer gets under `weights` (None: the data's own shares); None if no text has two."""
    totals: dict[str, float] = {}
    pairs: dict[tuple[str, str], float] = {}
    for i, key in enumerate(_balance_keys(questions, answers)):
        w = 1.0 if weights is None else float(weights[i])
        totals[key[0]] = totals.get(key[0], 0.0) + w
        pairs[key] = pairs.get(key, 0.0) + w
    rarest: dict[str, float] = {}
    kinds: dict[str, int] = {}
    for (q, _), w in pairs.items():
        rarest[q], kinds[q] = min(rarest.get(q, w), w), kinds.get(q, 0) + 1
    shares = sorted(rarest[q] / totals[q] for q in rarest if kinds[q] > 1)
    return shares[len(shares) // 2] if shares else None


def answer_balance_weights(questions: list[str], answers: list, strength: float) -> torch.Tensor:
    """Sampling weights that even out the answers to each question text.

    A question text q asked c_q times, c_qa of them with answer a, gives each of its rows the
    weight c_q * c_qa^-strength / sum_a' c_qa'^(1 - strength): every question text keeps its share
    of the epoch, and within it the answers' shares go from the data's (strength 0) to equal
    (strength 1). Built for templated questions ("is there a red shape?" answered "no" 7 times
    in 8) whose rare answer a run can otherwise leave unlearned; free-form questions, each asked
    once, keep weight 1."""
    check_number("the answer-balance strength", strength, 0, 1)
    keys = _balance_keys(questions, answers)
    pair_count: dict[tuple[str, str], int] = {}
    for key in keys:
        pair_count[key] = pair_count.get(key, 0) + 1
    question_count: dict[str, int] = {}
    norm: dict[str, float] = {}
    for (q, _), c in pair_count.items():
        question_count[q] = question_count.get(q, 0) + c
        norm[q] = norm.get(q, 0.0) + c ** (1.0 - strength)
    return torch.tensor([question_count[q] * pair_count[(q, a)] ** -strength / norm[q] for q, a in keys],
                        dtype=torch.float64)


def target_tokens(prompts: PromptBuilder, questions, captions) -> tuple[int, ...]:
    """Every token id the training targets hold (answers as the collator picks them, captions,
    EOT), ascending: what the LM head scores under --output-vocab data."""
    texts = [majority_answer(a) for a in questions["answers"]] if questions is not None else []
    texts += list(captions["caption"]) if captions is not None else []
    ids: set[int] = set()
    for text in dict.fromkeys(texts):
        ids.update(prompts.target_ids(text))
    return tuple(sorted(ids))


def check_targets_fit(prompts: PromptBuilder, questions, captions, source: str) -> None:
    """A ConfigError, before any training, unless every training target fits one example's
    context (PromptBuilder.room): the collator found an over-long one only when its batch came
    up, hundreds of steps in. Names the first such target, its length, the room, and the fixes."""
    for kind, texts in (("answer", [majority_answer(a) for a in questions["answers"]] if questions is not None else []),
                        ("caption", list(captions["caption"]) if captions is not None else [])):
        room = prompts.room(question=kind == "answer")
        lengths = {text: len(prompts.target_ids(text)) for text in dict.fromkeys(texts)}
        long = [i for i, text in enumerate(texts) if lengths[text] > room]
        if long:
            text = texts[long[0]]
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise ConfigError(
                f"{len(long)} of the {len(texts)} training {kind}s of {source} {'does' if len(long) == 1 else 'do'} "
                f"not fit the context: the first, "
                f"{shown!r}, is {lengths[text]} tokens with EOT, and a context "
                f"of {prompts.max_length} tokens less {prompts.num_image_tokens} image slots and the template leaves "
                f"{room}; use a longer context (--block-size, for a fresh GPT) or fewer image tokens, or shorten or "
                "drop those rows")


def captions_in_any_order(rows, share: float):
    """Scenes training captions (one per row) with the shapes of a `share` of the scenes named in a
    random order (mmfusion.data.scenes.caption_in_any_order), and a line saying how many changed."""
    from ..data.scenes import caption_in_any_order

    before = rows["caption"]
    rows = rows.map(lambda text, image_id: {"caption": caption_in_any_order(text, image_id, share)},
                    input_columns=["caption", "image_id"], desc="captions in any order")
    changed = sum(a != b for a, b in zip(before, rows["caption"]))
    return rows, (f"data: {changed} of {len(rows)} training captions name their shapes in another order than "
                  f"reading order (--caption-any-order {share:g}; a one-shape caption has no other)")


def split_index(virtual: int, n: int) -> tuple[int, int]:
    """A virtual index from EpochSampler -> (epoch, row)."""
    return divmod(virtual, n)


def example_generator(seed: int, virtual: int) -> torch.Generator:
    """A generator for one example's augmentation, a pure function of (seed, epoch, row)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + virtual)


class Rows(torch.utils.data.Dataset):
    """Serves rows of a datasets.Dataset by EpochSampler's virtual indices."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, virtual: int):
        return self.dataset[split_index(virtual, len(self.dataset))[1]]


class Conversations(torch.utils.data.Dataset):
    """VQA rows grouped by image into conversations of up to `turns` questions.

    Rows that share an `image_id` (>= 0) are grouped, in chunks of at most `turns`; rows with
    image_id -1 (the source had none) stay alone. The turns of a group come in a seeded random
    order, fixed per group, so the question a conversation opens with (the one seen exactly as
    at evaluation) varies across images. Items: {"image" (or "image_features" from FeatureRows),
    "turns": [(question, answers), ...]},
    which `VQACollator` turns into one sequence. Nothing is dropped: every row is in one group.
    """

    def __init__(self, dataset, turns: int, seed: int) -> None:
        if turns < 1:
            raise ConfigError(f"turns must be >= 1, got {turns}")
        self.dataset, self.turns = dataset, turns
        self.questions, self.answers = list(dataset["question"]), list(dataset["answers"])
        by_image: dict[int, list[int]] = {}
        groups = []
        for i, image_id in enumerate(dataset["image_id"]):
            if image_id < 0:
                groups.append([i])
            else:
                by_image.setdefault(image_id, []).append(i)
        groups += [rows[k:k + turns] for rows in by_image.values() for k in range(0, len(rows), turns)]
        groups.sort(key=lambda g: g[0])  # dataset order, independent of dict order
        g = torch.Generator().manual_seed(seed)
        self.groups = [[group[j] for j in torch.randperm(len(group), generator=g).tolist()] for group in groups]
        self.without_id = sum(1 for i in dataset["image_id"] if i < 0)

    def __len__(self) -> int:
        return len(self.groups)

    def __repr__(self) -> str:
        alone = (f"; {self.without_id} rows have no image_id and stay single questions: --turns groups rows by "
                 "that column, so add it to group them" if self.without_id and self.turns > 1 else "")
        return (f"{len(self.dataset)} questions in {len(self.groups)} conversations "
                f"(up to {self.turns} questions about one image each){alone}")

    def __getitem__(self, index: int) -> dict:
        group = self.groups[index]
        first = self.dataset[group[0]]
        image = {k: first[k] for k in ("image", "image_features") if k in first}  # FeatureRows: features
        return {**image, "turns": [(self.questions[i], self.answers[i]) for i in group]}


DEFAULT_HOLDOUT = 0.1
# Both stages' --eval-dataset and --holdout flags (field metadata) and their check.
EVAL_DATASET_FIELD = {"help": "evaluate on this source instead of --dataset (a file, folder or hub id; its --eval-split)"}
HOLDOUT_FIELD = {"help": "evaluate on this share of the training images, kept out of training (default: 0.1 when "
                         "the evaluation rows would be the training rows -- a single file, a saved Dataset or a "
                         "folder that names no split (class subfolders alone), or --eval-split equal to "
                         "--train-split -- else 0: the evaluation split)"}


def check_eval_choice(eval_dataset: str | None, holdout: float | None) -> None:
    if holdout is not None:
        check_number("--holdout", holdout, 0, 1, high_open=True)
        if holdout > 0 and eval_dataset is not None:
            raise ConfigError("--holdout and --eval-dataset both choose the evaluation rows; pass one")


class EvaluationRows(NamedTuple):
    """Which rows evaluate a run (evaluation_rows)."""
    train: list  # the training datasets, in train_rows' shape
    held: list | None  # the held-out rows, in the same shape; None when a split evaluates
    loaded: Any  # load_eval's result, when it was called
    line: str  # what the run prints about it
    record: dict | None  # what checkpoints keep of it: {"held_out_images": digest}, or None


def evaluation_rows(dataset: str, train_split: str, eval_dataset: str | None, eval_split: str,
                    holdout: float | None, train_rows: list, load_eval: Callable[[str], Any],
                    scored: list[bool] | None = None):
    """Which rows evaluate a run (EvaluationRows: training rows, held-out rows or None, load_eval's
    result or None, a line saying which, the checkpoint's record of it). `train_rows` is a list of
    the training datasets (None where a kind is not used, e.g. [questions, captions]); the held-out
    rows come as a list of the same shape. The evaluation split of `eval_dataset or dataset` is
    loaded by load_eval(source); a held-out share of the training images is taken instead with
    --holdout, and by default when the two would be the same rows (a single file has one split)."""
    from ..data.splits import hold_out_all, same_rows

    reuse = same_rows(dataset, train_split, eval_dataset, eval_split)
    fraction = (DEFAULT_HOLDOUT if reuse else 0.0) if holdout is None else holdout
    present = [rows for rows in train_rows if rows is not None]
    if fraction > 0 and present:
        pairs, digest = hold_out_all(train_rows, fraction, f"{dataset} [{train_split}]", scored)  # the same images, every kind
        kept, held = [p[0] for p in pairs], [p[1] for p in pairs]
        n_held, n_kept = next((len(h), len(k)) for k, h in pairs if k is not None)
        why = "" if holdout is not None else (" (a single file, saved Dataset or folder has one split here; "
                                              "--eval-dataset names other data)")
        if eval_dataset is not None:  # it names the training data, however spelled (./x, a link)
            why = f" (--eval-dataset {eval_dataset} is the training data)"
        line = (f"evaluation: {n_held} of the {n_held + n_kept} rows of {dataset} held out of training by image "
                f"(--holdout {fraction:g}; images {digest}){why}")
        return EvaluationRows(kept, held, None, line, {"held_out_images": digest})
    source = eval_dataset or dataset
    line = f"evaluation: {source} [{eval_split}]"
    if reuse and present:
        line = (f"WARNING: evaluating on the training rows ({source} [{eval_split}], --holdout 0): the accuracy "
                "says how well the model fits them, not how it does on new data")
    return EvaluationRows(train_rows, None, load_eval(source), line, None)
