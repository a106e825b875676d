"""Data: the embedded easy-VQA views, and user datasets (parquet, JSON lines, image folders)."""

import io
import json
import os
import time
from collections import Counter

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmfusion.data import (
    CLASS_NAMES,
    EASY_VQA,
    DatasetError,
    load_classification,
    load_easy_vqa_classification,
    load_easy_vqa_vqa,
    load_image_classification,
    load_vqa,
    load_vqa_dataset,
)
from mmfusion.data.easy_vqa import COLORS, SHAPES
from mmfusion.data.image_keys import check_image_ids

# ---------------------------------------------------------------------------------------------
# easy-VQA


@pytest.fixture(scope="module")
def easy():
    return {(kind, split): load(split) for split in ("train", "test")
            for kind, load in (("cls", load_easy_vqa_classification), ("vqa", load_easy_vqa_vqa))}


def test_easy_vqa_builds_fast():
    for load in (load_easy_vqa_classification, load_easy_vqa_vqa):
        start = time.perf_counter()
        load("train")
        assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize("split, images, questions, yes_no", [("train", 4000, 38575, 28407),
                                                              ("test", 1000, 9673, 7136)])
def test_easy_vqa_vqa_view(easy, split, images, questions, yes_no):
    ds = easy["vqa", split]
    assert len(ds) == questions
    assert len(set(ds["image_id"])) == images
    check_image_ids(ds, EASY_VQA)  # why the loader need not check its own ids (0.3 s a load)
    assert ds.column_names == ["image", "question", "answers", "answer_type", "image_id"]
    assert isinstance(ds.features["image"], datasets.Image)
    answers = [a for row in ds["answers"] for a in row]
    assert len(answers) == questions  # one answer per question
    assert len(set(answers)) == 13
    assert Counter(ds["answer_type"]) == {"yes/no": yes_no, "other": questions - yes_no}
    row = ds[0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (64, 64)
    assert isinstance(row["question"], str) and row["question"].endswith("?")


def _consistent(question: str, answer: str, color: str, shape: str) -> bool:
    """Does a question/answer pair agree with an image of `color` `shape`? Judged word by word."""
    words = question.rstrip("?").split()
    if question.startswith("what"):
        named = [w for w in words if w in COLORS or w in SHAPES]
        return answer in (color, shape) and all(w in (color, shape) for w in named)
    (word,) = [w for w in words if w in COLORS or w in SHAPES]
    present = word in (color, shape)
    negated = "not" in words or "no" in words
    return (answer == "yes") == (present != negated)


@pytest.mark.parametrize("split, labelled", [("train", 3578), ("test", 888)])
def test_easy_vqa_classification_labels(easy, split, labelled):
    ds = easy["cls", split]
    assert len(ds) == labelled
    assert ds.features["label"].names == list(CLASS_NAMES) and len(CLASS_NAMES) == 24
    assert CLASS_NAMES[0] == "black circle" and CLASS_NAMES[-1] == "yellow triangle"
    assert set(ds["label"]) == set(range(24))  # every class present
    # Every question about a labelled image agrees with its label.
    label_of = {int(os.path.basename(row["image"]["path"])[:-4]): CLASS_NAMES[row["label"]]
                for row in ds.cast_column("image", datasets.Image(decode=False))}
    vqa = easy["vqa", split]
    checked = 0
    for question, answers, image_id in zip(vqa["question"], vqa["answers"], vqa["image_id"]):
        if image_id in label_of:
            color, shape = label_of[image_id].split()
            assert _consistent(question, answers[0], color, shape), (image_id, question, answers)
            checked += 1
    assert checked > 0.85 * len(vqa)


def test_easy_vqa_dispatch_and_report():
    ds, report = load_classification(EASY_VQA, "test")
    assert (report.total, report.kept, report.skipped) == (1000, 888, {"no_label_info": 112})
    ds, report = load_vqa_dataset(EASY_VQA, "test")
    assert (report.total, report.kept, report.skipped) == (9673, 9673, {})
    load_classification(EASY_VQA, "test", image_column="image", max_bad_fraction=0.5)  # defaults are fine
    with pytest.raises(DatasetError, match="--image-column"):
        load_classification(EASY_VQA, "test", image_column="img")
    with pytest.raises(DatasetError, match="splits"):
        load_easy_vqa_vqa("validation")


# ---------------------------------------------------------------------------------------------
# User data


def _png(path=None, color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def vqa_dir(tmp_path):
    """A JSON lines VQA set in a folder, with relative image paths, one bad row of each kind."""
    for i in range(4):
        _png(tmp_path / "images" / f"{i}.png", (60 * i, 0, 0))
    (tmp_path / "images" / "corrupt.png").write_bytes(_png()[:40])  # truncated
    good = [
        {"image": "images/0.png", "question": "Is it red? ", "answer": "Yes"},
        {"image": "images/1.png", "question": "How many?", "answer": ["two", "2", "2"]},
        {"image": "images/2.png", "question": "What color?", "answer": [{"answer": "red", "answer_id": 1}]},
        {"image": str(tmp_path / "images" / "3.png"), "question": "What?", "answer": ["dark red", " ", "red"]},
    ]
    bad = [
        {"image": "images/missing.png", "question": "q?", "answer": "a"},
        {"image": "images/corrupt.png", "question": "q?", "answer": "a"},
        {"image": "images/0.png", "question": "   ", "answer": "a"},
        {"image": "images/0.png", "question": "q?", "answer": None},
        {"image": None, "question": "q?", "answer": "a"},
    ]
    return _jsonl(tmp_path / "vqa.jsonl", good + bad)


def test_jsonl_vqa_skips_and_counts_bad_rows(vqa_dir, tmp_path, caplog):
    ds, report = load_vqa(vqa_dir, "validation", answer_column="answer", max_bad_fraction=0.6,
                          cache_dir=str(tmp_path / "cache"))
    assert (report.total, report.kept) == (9, 4)
    assert report.skipped == {"missing_image": 2, "unreadable_image": 1, "empty_question": 1, "empty_answer": 1}
    assert "skipped 5" in caplog.text
    assert ds.column_names == ["image", "question", "answers", "answer_type", "image_id"]
    assert ds["question"] == ["Is it red?", "How many?", "What color?", "What?"]
    assert ds["answers"] == [["Yes"], ["two", "2", "2"], ["red"], ["dark red", "red"]]
    assert ds["answer_type"] == ["yes/no", "number", "other", "other"]
    assert ds["image_id"] == [-1] * 4
    assert ds[0]["image"].size == (8, 8) and ds[3]["image"].getpixel((0, 0)) == (180, 0, 0)


def test_too_many_bad_rows_raise(vqa_dir, tmp_path):
    with pytest.raises(DatasetError, match=r"5 \(.*--max-bad-fraction"):
        load_vqa(vqa_dir, "train", answer_column="answer", cache_dir=str(tmp_path / "cache"))


def test_missing_and_mistyped_columns_raise(vqa_dir, tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(DatasetError, match=r"'picture'.*\['image', 'question', 'answer'\].*--image-column"):
        load_vqa(vqa_dir, "train", image_column="picture", cache_dir=cache)
    path = _jsonl(tmp_path / "numeric.jsonl", [{"image": "images/0.png", "question": 3, "answer": "a"}])
    with pytest.raises(DatasetError, match="'question' holds whole numbers.*--question-column"):
        load_vqa(path, "train", cache_dir=cache)
    with pytest.raises(DatasetError, match="no such file"):
        load_vqa(tmp_path / "nope.jsonl", "train", cache_dir=cache)


def test_parquet_vqa_with_bytes_and_answer_records(tmp_path):
    """VQAv2-like: embedded image bytes, ten answer records per question, an answer_type column."""
    good, corrupt = _png(), b"not an image"
    records = [[{"answer": "2", "answer_id": k} for k in range(3)] + [{"answer": "3", "answer_id": k}
                                                                      for k in range(3, 10)]]
    table = pa.table({
        "image": [{"bytes": good, "path": None}, {"bytes": corrupt, "path": None}],
        "question": ["How many?", "How many?"],
        "answers": records * 2,
        "answer_type": ["number", "number"],
        "image_id": [7, 8],
    })
    pq.write_table(table, tmp_path / "vqa.parquet")
    ds, report = load_vqa(tmp_path / "vqa.parquet", "test", max_bad_fraction=0.5, cache_dir=str(tmp_path / "c"))
    assert report.skipped == {"unreadable_image": 1}
    assert ds[0]["answers"] == ["2"] * 3 + ["3"] * 7
    assert (ds[0]["answer_type"], ds[0]["image_id"]) == ("number", 7)
    assert ds[0]["image"].size == (8, 8)


def test_answer_column_shapes(tmp_path):
    """A dict of lists (the legacy `Sequence` of records) works; a number in a JSON column is an error."""
    _png(tmp_path / "0.png")
    features = datasets.Features({"image": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answers": datasets.Sequence({"answer": datasets.Value("string")})})
    datasets.Dataset.from_dict({"image": ["0.png"], "question": ["q?"], "answers": [{"answer": ["no", "No"]}]},
                               features=features).to_parquet(str(tmp_path / "seq.parquet"))
    ds, _ = load_vqa(tmp_path / "seq.parquet", "train", cache_dir=str(tmp_path / "c"))
    assert (ds[0]["answers"], ds[0]["answer_type"]) == (["no", "No"], "yes/no")
    path = _jsonl(tmp_path / "mixed.jsonl", [{"image": "0.png", "question": "q?", "answer": "2"},
                                             {"image": "0.png", "question": "q?", "answer": 2}])
    with pytest.raises(DatasetError, match="write numbers as strings"):
        load_vqa(path, "train", cache_dir=str(tmp_path / "c"))


def test_parquet_classification_folder_with_string_labels(tmp_path):
    """A folder holding a parquet with image paths relative to the folder, and string labels."""
    folder = tmp_path / "set"
    for i in range(3):
        _png(folder / "img" / f"{i}.png")
    features = datasets.Features({"picture": datasets.Value("string"), "kind": datasets.Value("string")})
    datasets.Dataset.from_dict({"picture": ["img/0.png", "img/1.png", "img/2.png", "img/9.png"],
                                "kind": ["zebra", "ant", "zebra", "ant"]}, features=features
                               ).to_parquet(str(folder / "train.parquet"))
    ds, report = load_image_classification(folder, "train", image_column="picture", label_column="kind",
                                           max_bad_fraction=0.25, cache_dir=str(tmp_path / "c"))
    assert report.skipped == {"missing_image": 1}
    assert ds.features["label"].names == ["ant", "zebra"]  # sorted
    assert ds["label"] == [1, 0, 1]
    assert ds.column_names == ["image", "label"]
    with pytest.raises(DatasetError, match="split"):
        load_image_classification(folder, "test", image_column="picture", label_column="kind",
                                  cache_dir=str(tmp_path / "c"))


def test_parquet_with_image_feature_and_int_labels(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": [{"bytes": _png(), "path": None}] * 3, "label": [2, 0, None]},
                               features=features).to_parquet(str(tmp_path / "x.parquet"))
    ds, report = load_image_classification(tmp_path / "x.parquet", "train", max_bad_fraction=0.5,
                                           cache_dir=str(tmp_path / "c"))
    assert report.skipped == {"missing_label": 1}
    assert ds.features["label"].names == ["0", "1", "2"] and ds["label"] == [2, 0]


def test_image_folder_classification(tmp_path):
    for name in ("cat", "dog"):
        for i in range(3):
            _png(tmp_path / "pets" / name / f"{i}.png")
    (tmp_path / "pets" / "dog" / "broken.png").write_bytes(b"\x89PNG garbage")
    ds, report = load_image_classification(tmp_path / "pets", "train", max_bad_fraction=0.2,
                                           cache_dir=str(tmp_path / "c"))
    assert (report.total, report.kept, report.skipped) == (7, 6, {"unreadable_image": 1})
    assert ds.features["label"].names == ["cat", "dog"]
    assert sorted(ds["label"]) == [0, 0, 0, 1, 1, 1]
    assert isinstance(ds[0]["image"], Image.Image)


def test_empty_split_raises(tmp_path):
    pq.write_table(pa.table({"image": pa.array([], pa.string()), "label": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    with pytest.raises(DatasetError, match="empty"):
        load_image_classification(tmp_path / "empty.parquet", "train", cache_dir=str(tmp_path / "c"))


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="would try the network")
def test_unknown_hub_id_raises(tmp_path):
    with pytest.raises(DatasetError, match="Hugging Face Hub"):
        load_vqa("no-such-owner/no-such-dataset", "train", cache_dir=str(tmp_path / "c"))
