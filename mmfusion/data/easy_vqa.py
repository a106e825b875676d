"""easy-VQA, the embedded default dataset, as two `datasets.Dataset` views.

The data ships inside the `easy_vqa` package (MIT): for each split, 64x64 PNGs
under `data/<split>/images/<image_id>.png` and `data/<split>/questions.json`, a
list of `[question, answer, image_id]`. Every image holds exactly one shape
(circle, rectangle or triangle) in one of 8 colors; the 13 answers are those 11
words plus "yes" and "no".

- `load_easy_vqa_vqa(split)`: one row per question.
- `load_easy_vqa_classification(split)`: one row per image, labelled with one of
  24 "<color> <shape>" classes. easy-VQA has no labels of its own, so each label
  is derived from the image's questions (`_derive_labels`): open questions name
  the color or shape outright ("what color is the shape?" -> color; "what is
  the blue shape?" -> blue and the shape); a yes/no question says one color or
  shape is present or absent, and absences settle a value only when they leave
  a single candidate. Not every image is asked enough to pin both down:

  | split | images | open questions only | + yes/no "present" | + elimination | dropped |
  | train |  4,000 |               3,181 |                361 |            36 |     422 |
  | test  |  1,000 |                 791 |                 89 |             8 |     112 |

  so the classification views hold 3,578 and 888 images (all 24 classes occur
  in both). The dropped images stay in the VQA view; the count is in the
  `LoadReport` from `easy_vqa_classification` (reason "no_label_info").

Images are stored as file paths under an `Image()` feature, so decoding is lazy
and nothing is written to disk.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import datasets

from .local import DatasetError, LoadReport

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")  # sorted
SHAPES = ("circle", "rectangle", "triangle")  # sorted
CLASS_NAMES = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)  # id = 3 * color + shape

# Open questions: (template, what the slot in the question names, what the answer names).
_OPEN = [
    (re.compile(r"what color is the (\w+)\?"), "shape", "color"),
    (re.compile(r"what is the color of the (\w+)\?"), "shape", "color"),
    (re.compile(r"what is the (\w+) shape\?"), "color", "shape"),
    (re.compile(r"what shape (?:does the image contain|is in the image|is present)\?"), None, "shape"),
]
# Yes/no questions about one color or shape word; group 1 is the negation, group 2 the word.
_YES_NO = [
    re.compile(r"does the image (not )?contain a (\w+)(?: shape)?\?"),
    re.compile(r"is (?:a|(no)) (\w+)(?: shape)? present\?"),
    re.compile(r"is there (not )?a (\w+)(?: shape)?(?: in the image)?\?"),
]


def _data_dir() -> Path:
    try:
        import easy_vqa  # the package also installs a top-level `test` package; we never import that
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise DatasetError("the embedded dataset needs the `easy-vqa` package: pip install easy-vqa") from e
    return Path(easy_vqa.__file__).parent / "data"


def _check_split(split: str) -> Path:
    if split not in SPLITS:
        raise DatasetError(f"easy-vqa has splits {list(SPLITS)}, not {split!r}")
    return _data_dir() / split


def _read_questions(split: str) -> tuple[list[list], dict[int, str]]:
    """Return the split's `[question, answer, image_id]` rows and `{image_id: png path}`."""
    root = _check_split(split)
    with open(root / "questions.json") as f:
        questions = json.load(f)
    paths = {int(p.stem): str(p) for p in (root / "images").glob("*.png")}
    missing = {image_id for _, _, image_id in questions} - paths.keys()
    if missing:
        raise DatasetError(f"easy-vqa {split}: questions refer to {len(missing)} images with no PNG, "
                           f"e.g. {sorted(missing)[:5]}; reinstall easy-vqa")
    return questions, paths


def _kind(word: str) -> str | None:
    return "color" if word in COLORS else "shape" if word in SHAPES else None


def _facts(question: str, answer: str) -> list[tuple[str, str, bool]]:
    """What one question/answer pair says about its image, as `(kind, word, present)` facts.

    Raises `DatasetError` on a question that matches no known template, so a
    change in the data cannot silently mislabel images.
    """
    for pattern, slot, answered in _OPEN:
        m = pattern.fullmatch(question)
        if m is None:
            continue
        if _kind(answer) != answered:
            raise DatasetError(f"easy-vqa: {question!r} answered {answer!r}, expected a {answered}")
        facts = [(answered, answer, True)]
        if slot is not None and _kind(m.group(1)) == slot:  # "what color is the shape?" names no shape
            facts.append((slot, m.group(1), True))
        return facts
    for pattern in _YES_NO:
        m = pattern.fullmatch(question)
        if m is None or _kind(m.group(2)) is None:
            continue
        if answer not in ("yes", "no"):
            raise DatasetError(f"easy-vqa: yes/no question {question!r} answered {answer!r}")
        present = (answer == "yes") != (m.group(1) is not None)
        return [(_kind(m.group(2)), m.group(2), present)]
    raise DatasetError(f"easy-vqa: no label template matches question {question!r}")


def _derive_labels(questions: list[list]) -> tuple[dict[int, int], dict[str, int]]:
    """Derive each image's class id from its questions.

    Returns `({image_id: class id}, counts)`, where counts has `elimination`
    (images whose color or shape was settled only by ruling out the others) and
    `no_label_info` (images whose questions leave more than one candidate; they
    get no label).
    Raises `DatasetError` when an image's questions contradict each other.
    """
    present: dict[int, dict[str, set[str]]] = {}
    absent: dict[int, dict[str, set[str]]] = {}
    for question, answer, image_id in questions:
        for kind, word, is_present in _facts(question, answer):
            table = present if is_present else absent
            table.setdefault(image_id, {"color": set(), "shape": set()})[kind].add(word)

    labels, counts = {}, {"elimination": 0, "no_label_info": 0}
    for image_id in sorted({q[2] for q in questions}):
        pos = present.get(image_id, {"color": set(), "shape": set()})
        neg = absent.get(image_id, {"color": set(), "shape": set()})
        chosen, eliminated = {}, False
        for kind, vocabulary in (("color", COLORS), ("shape", SHAPES)):
            if pos[kind] & neg[kind] or len(pos[kind]) > 1:
                raise DatasetError(f"easy-vqa image {image_id}: its questions disagree about its {kind} "
                                   f"(present: {sorted(pos[kind])}, absent: {sorted(neg[kind])})")
            candidates = pos[kind] or set(vocabulary) - neg[kind]
            eliminated |= not pos[kind]
            chosen[kind] = next(iter(candidates)) if len(candidates) == 1 else None
        if chosen["color"] is None or chosen["shape"] is None:
            counts["no_label_info"] += 1
            continue
        counts["elimination"] += eliminated
        labels[image_id] = COLORS.index(chosen["color"]) * len(SHAPES) + SHAPES.index(chosen["shape"])
    return labels, counts


def easy_vqa_classification(split: str) -> tuple[datasets.Dataset, LoadReport]:
    """`load_easy_vqa_classification` plus the `LoadReport` of how many images got a label."""
    questions, paths = _read_questions(split)
    labels, counts = _derive_labels(questions)
    image_ids = sorted(labels)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASS_NAMES))})
    ds = datasets.Dataset.from_dict(
        {"image": [paths[i] for i in image_ids], "label": [labels[i] for i in image_ids]}, features=features
    )
    # Images with no question at all cannot be labelled either.
    skipped = {"no_label_info": counts["no_label_info"] + len(paths.keys() - {q[2] for q in questions})}
    skipped = {k: v for k, v in skipped.items() if v}
    report = LoadReport(source="easy-vqa", split=split, total=len(paths), kept=len(ds), skipped=skipped)
    if counts["elimination"]:
        logger.info("easy-vqa %s: %d images labelled by elimination", split, counts["elimination"])
    if skipped:  # expected and documented above, so not a warning
        logger.info("%s", report)
    return ds, report


def load_easy_vqa_classification(split: str) -> datasets.Dataset:
    """easy-VQA as 24-way image classification, one row per image, sorted by image id.

    Columns: `image` (`Image()`, a PNG path, decoded lazily) and `label`
    (`ClassLabel` over `CLASS_NAMES`, "<color> <shape>" with sorted colors outer
    and sorted shapes inner, so ids are stable). `split` is "train" (3,578 of
    its 4,000 images) or "test" (888 of 1,000): images whose questions do not
    determine both color and shape are left out (see the module docstring).
    Raises `DatasetError` for another split or when an image's questions
    contradict each other.
    """
    return easy_vqa_classification(split)[0]


def load_easy_vqa_vqa(split: str) -> datasets.Dataset:
    """easy-VQA as VQA, one row per question, in the order the package ships them.

    Columns: `image` (`Image()`, a PNG path), `question` (str), `answers`
    (list[str], one answer here), `answer_type` ("yes/no" or "other"; easy-VQA
    has no counting questions) and `image_id` (int). `split` is "train" (38,575
    questions) or "test" (9,673).
    """
    questions, paths = _read_questions(split)
    features = datasets.Features({
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")),
        "answer_type": datasets.Value("string"),
        "image_id": datasets.Value("int64"),
    })
    return datasets.Dataset.from_dict({
        "image": [paths[i] for _, _, i in questions],
        "question": [q for q, _, _ in questions],
        "answers": [[a] for _, a, _ in questions],
        "answer_type": ["yes/no" if a in ("yes", "no") else "other" for _, a, _ in questions],
        "image_id": [i for _, _, i in questions],
    }, features=features)
