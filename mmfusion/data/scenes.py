"""Scenes: a procedural, seeded dataset of shapes with captions and questions.

Each scene is a 64x64 image on a light, randomly tinted background holding 1 to 4
shapes, one per cell of a 2x2 grid, each jittered inside its cell:

- color: red, green, blue, yellow, purple, black (`COLORS`)
- shape: circle, square, triangle (`SHAPES`)
- size: small (12 px) or large (24 px) (`SIZES`)
- position: top left, top right, bottom left, bottom right (`POSITIONS`)

The caption names every shape in reading order, with its position, in one
deterministic sentence: "a large red circle at the top left and a small blue
triangle at the bottom right". Questions (`QUESTIONS_PER_SCENE` per scene, no
repeats) ask about color, shape, size, count, position and presence; their
answers are single words or a position ("top left"), and each carries an
answer type ("yes/no", "number" or "other") as in VQA.

Everything is a pure function of (split seed, scene index): scene `i` of a split
is drawn from `numpy.random.default_rng((seed, i))`, so any scene can be made
on its own, in any order, on any machine, and `train` and `test` use different
seeds (`SPLIT_SEEDS`). Images are drawn at 4x and downsampled, which gives
antialiased edges like a photo of a drawing.

`load_scenes_cells(split)` labels each cell of the 2x2 grid (`CELL_CLASSES`: empty or
"<size> <color> <shape>"), the dense target that pretrains a ViT for this data.

`load_scenes_vqa(split)` / `load_scenes_captions(split)` return
`datasets.Dataset`s in the schemas of `mmfusion.data` (images as PNG bytes in
memory; nothing is written to disk).
"""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image, ImageDraw

from .local import DatasetError

SCENES = "scenes"
COLORS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 220), "yellow": (230, 190, 20),
          "purple": (140, 70, 180), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 12, "large": 24}  # side / diameter in pixels at IMAGE_SIZE
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # reading order; cell index = 2 * row + col
IMAGE_SIZE = 64
SPLIT_SEEDS = {"train": 20261122, "test": 7}
SPLIT_SIZES = {"train": 5000, "test": 1000}
QUESTIONS_PER_SCENE = 6
_NUMBERS = ("zero", "one", "two", "three", "four")
# Per-cell classes for ViT pretraining (`load_scenes_cells`): what, if anything, fills a cell.
CELL_CLASSES = ("empty",) + tuple(f"{size} {color} {shape}" for color in COLORS for shape in SHAPES for size in SIZES)
_SUPERSAMPLE = 4
_ORDER_SEED = 31  # caption_in_any_order's draws, apart from the scenes' own
_PHRASE = re.compile(rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) at the ({'|'.join(POSITIONS)})")


@dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    size: str
    cell: int  # index into POSITIONS
    dx: float  # offset of the center from the cell's center, in pixels
    dy: float

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # in reading order (by cell)
    background: tuple[int, int, int]
    index: int = 0


def make_scene(seed: int, index: int) -> Scene:
    """Scene `index` of the split with this seed: a pure function of both."""
    rng = np.random.default_rng((seed, index))
    count = int(rng.integers(1, 5))
    cells = sorted(rng.choice(len(POSITIONS), size=count, replace=False).tolist())
    shapes = []
    for cell in cells:
        size = ("small", "large")[int(rng.integers(2))]
        room = IMAGE_SIZE / 4 - SIZES[size] / 2 - 2  # keep a 2 px margin inside the cell
        shapes.append(Shape(color=list(COLORS)[int(rng.integers(len(COLORS)))],
                            shape=SHAPES[int(rng.integers(len(SHAPES)))], size=size, cell=cell,
                            dx=float(rng.uniform(-room, room)), dy=float(rng.uniform(-room, room))))
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    return Scene(shapes=tuple(shapes), background=background, index=index)


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB image of `image_size` pixels (drawn at 4x, then downsampled)."""
    scale = _SUPERSAMPLE * image_size / IMAGE_SIZE
    canvas = Image.new("RGB", (_SUPERSAMPLE * image_size,) * 2, scene.background)
    draw = ImageDraw.Draw(canvas)
    for s in scene.shapes:
        row, col = divmod(s.cell, 2)
        cx = (IMAGE_SIZE / 4 + col * IMAGE_SIZE / 2 + s.dx) * scale
        cy = (IMAGE_SIZE / 4 + row * IMAGE_SIZE / 2 + s.dy) * scale
        r = SIZES[s.size] / 2 * scale
        if s.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLORS[s.color])
        elif s.shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=COLORS[s.color])
        else:  # an upward equilateral-looking triangle filling the same box
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=COLORS[s.color])
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def caption(scene: Scene) -> str:
    """One deterministic sentence naming every shape in reading order, with its position."""
    return _join([f"a {s.size} {s.color} {s.shape} at the {s.position}" for s in scene.shapes])


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption_in_any_order(text: str, image_id: int, share: float) -> str:
    """For a `share` of the scenes (drawn from `image_id`, so always the same ones), `text`'s shapes
    named in a random order, else `text` as it is. Training captions only: in reading order a model
    can write every "at the P" by looking where it just looked; in any order it has to find the shape
    it named, the skill the questions that search by color and shape need (docs/experiments.md,
    2026-12-01). Reading order stays the likeliest order, so greedy captions keep it."""
    rng = np.random.default_rng((_ORDER_SEED, image_id))
    if rng.random() >= share:
        return text
    head, sep, last = text.rpartition(" and ")
    parts = [*head.split(", "), last] if sep else [text]
    if not all(_PHRASE.fullmatch(p) for p in parts):
        raise DatasetError(f"not a scenes caption: {text!r}; any-order captions are for the built-in scenes only")
    return _join([parts[i] for i in rng.permutation(len(parts))])


def _candidates(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Every question type once, as (question, answer, answer type); `rng` picks the subjects."""
    shapes = scene.shapes
    by_cell = {s.cell: s for s in shapes}
    names = [s.name for s in shapes]
    unique = [s for s in shapes if names.count(s.name) == 1]
    pick = shapes[int(rng.integers(len(shapes)))]
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    cell = int(rng.integers(len(POSITIONS)))
    # Presence questions are balanced: half ask about something that is there.
    if rng.random() < 0.5:
        asked = pick.name
    else:
        asked = f"{color} {shape}"
    out = [
        ("how many shapes are there?", _NUMBERS[len(shapes)], "number"),
        (f"how many {color} shapes are there?", _NUMBERS[sum(s.color == color for s in shapes)], "number"),
        (f"what color is the shape at the {pick.position}?", pick.color, "other"),
        (f"what shape is at the {pick.position}?", pick.shape, "other"),
        (f"is there a {asked}?", "yes" if asked in names else "no", "yes/no"),
        (f"is there a {shape}?", "yes" if any(s.shape == shape for s in shapes) else "no", "yes/no"),
        (f"is there a shape at the {POSITIONS[cell]}?", "yes" if cell in by_cell else "no", "yes/no"),
    ]
    if unique:
        u = unique[int(rng.integers(len(unique)))]
        out.append((f"where is the {u.name}?", u.position, "other"))
        out.append((f"is the {u.name} large or small?", u.size, "other"))
    return out


def question_template(question: str) -> str:
    """The question with its color, shape and position words replaced by C, S and P
    ("is there a red circle?" -> "is there a C S?"): the key for per-template accuracy."""
    question = re.sub(r"\b(" + "|".join(COLORS) + r")\b", "C", question)
    question = re.sub(r"\b(" + "|".join(SHAPES) + r")\b", "S", question)
    return re.sub(r"\b(" + "|".join(POSITIONS) + r")\b", "P", question)


def questions(scene: Scene, seed: int, k: int = QUESTIONS_PER_SCENE) -> list[tuple[str, str, str]]:
    """Up to `k` distinct (question, answer, answer type) triples, a pure function of (scene, seed)."""
    rng = np.random.default_rng((seed, scene.index, 1))
    pool = list(dict.fromkeys(_candidates(scene, rng)))  # distinct, in order
    chosen = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
    return [pool[i] for i in sorted(chosen.tolist())]


def _check(split: str, num_scenes: int | None) -> int:
    if split not in SPLIT_SEEDS:
        raise DatasetError(f"{SCENES} has splits {list(SPLIT_SEEDS)}, not {split!r}")
    n = SPLIT_SIZES[split] if num_scenes is None else num_scenes
    if not isinstance(n, int) or n < 1:
        raise DatasetError(f"{SCENES}: num_scenes must be a positive integer, got {num_scenes!r}")
    return n


@functools.lru_cache(maxsize=4)
def _scenes(split: str, n: int) -> tuple[tuple[Scene, ...], tuple[bytes, ...]]:
    seed = SPLIT_SEEDS[split]
    scenes = tuple(make_scene(seed, i) for i in range(n))
    pngs = []
    for scene in scenes:
        buffer = io.BytesIO()
        render(scene).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return scenes, tuple(pngs)


def load_scenes_captions(split: str, num_scenes: int | None = None) -> datasets.Dataset:
    """One row per scene: `image` (`Image()`), `caption` (str), `image_id` (int, the scene index).

    `split` is "train" (5,000 scenes by default) or "test" (1,000); `num_scenes`
    takes the first N scenes of the split instead (they do not depend on N).
    """
    n = _check(split, num_scenes)
    scenes, pngs = _scenes(split, n)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "image_id": datasets.Value("int64")})
    return datasets.Dataset.from_dict({
        "image": [{"bytes": b, "path": None} for b in pngs],
        "caption": [caption(s) for s in scenes],
        "image_id": [s.index for s in scenes],
    }, features=features)


def cell_labels(scene: Scene) -> list[int]:
    """The `CELL_CLASSES` id of each cell, in reading order (2 * row + col)."""
    labels = [0] * len(POSITIONS)
    for s in scene.shapes:
        labels[s.cell] = CELL_CLASSES.index(f"{s.size} {s.color} {s.shape}")
    return labels


def load_scenes_cells(split: str, num_scenes: int | None = None) -> datasets.Dataset:
    """One row per scene: `image` and `label`, a list of 4 `CELL_CLASSES` ids (one per cell of
    the 2x2 grid, reading order) for a ViT with `label_grid=2`."""
    n = _check(split, num_scenes)
    scenes, pngs = _scenes(split, n)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.List(datasets.ClassLabel(names=list(CELL_CLASSES)))})
    return datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in pngs],
                                       "label": [cell_labels(s) for s in scenes]}, features=features)


def load_scenes_vqa(split: str, num_scenes: int | None = None) -> datasets.Dataset:
    """One row per question, `QUESTIONS_PER_SCENE` per scene, in the VQA schema:
    `image`, `question`, `answers` (one answer), `answer_type`, `image_id`."""
    n = _check(split, num_scenes)
    scenes, pngs = _scenes(split, n)
    seed = SPLIT_SEEDS[split]
    rows: dict[str, list] = {"image": [], "question": [], "answers": [], "answer_type": [], "image_id": []}
    for scene, png in zip(scenes, pngs):
        for question, answer, kind in questions(scene, seed):
            rows["image"].append({"bytes": png, "path": None})
            rows["question"].append(question)
            rows["answers"].append([answer])
            rows["answer_type"].append(kind)
            rows["image_id"].append(scene.index)
    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")), "answer_type": datasets.Value("string"),
        "image_id": datasets.Value("int64"),
    })
    return datasets.Dataset.from_dict(rows, features=features)

