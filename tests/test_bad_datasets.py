"""Bad datasets: a missing column, a column of the wrong type, null or unreadable images, an empty
split. Each raises DatasetError naming the column and the flag that fixes it (API), or ends the
CLI with one line and exit code 2. A few bad rows among good ones are skipped and counted."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmfusion import processing
from mmfusion.cli import main
from mmfusion.data import DatasetError, load_image_classification, load_vqa


def png(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def write_source(folder: Path, name: str, rows: list[dict] | pa.Table) -> Path:
    """Rows as JSON lines (image paths relative to `folder`), or an arrow table as parquet."""
    (folder / "ok.png").write_bytes(png())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    if isinstance(rows, pa.Table):
        path = folder / f"{name}.parquet"
        pq.write_table(rows, path)
    else:
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cls(image="ok.png", label="red", n=4):
    return [{"image": image, "label": label}] * n


def qa(image="ok.png", question="what color?", answers="red", n=4):
    return [{"image": image, "question": question, "answers": answers}] * n


# name: (task, rows, loader options as CLI flags, message fragments)
CASES = {
    # classification
    "cls_missing_image_column": ("cls", [{"picture": "ok.png", "label": "red"}] * 4, [],
                                 ["no column 'image'", "['picture', 'label']", "--image-column"]),
    "cls_missing_label_column": ("cls", [{"image": "ok.png", "kind": "red"}] * 4, [],
                                 ["no column 'label'", "--label-column"]),
    "cls_label_floats": ("cls", cls(label=1.5), [], ["'label' holds numbers,", "--label-column"]),
    "cls_label_lists": ("cls", cls(label=["red"]), [], ["'label' holds lists of text", "--label-column"]),
    "cls_image_integers": ("cls", cls(image=7), [], ["'image' holds whole numbers", "--image-column"]),
    "cls_image_records_without_path": ("cls", cls(image={"url": "x"}), [], [
                                       "'image' holds objects with the keys 'url'", "--image-column"]),
    "cls_images_all_null": ("cls", cls(image=None), [], ["'image' is null in every row", "--image-column"]),
    "cls_labels_all_null": ("cls", cls(label=None), [], ["'label' is null in every row", "--label-column"]),
    "cls_images_all_unreadable": ("cls", cls(image="broken.png"), [],
                                  ["unreadable_image=4", "--max-bad-fraction"]),
    "cls_images_all_missing": ("cls", cls(image="gone.png"), [], ["missing_image=4", "--max-bad-fraction"]),
    "cls_label_sparse_integers": ("cls", [{"image": "ok.png", "label": n} for n in (0, 1, 2, 2_000_000)], [],
                                  ["integer labels up to 2000000 (4 distinct", "2000001 classes", "as strings"]),
    "cls_labels_all_blank": ("cls", cls(label="  "), [], ["'label' has no usable labels"]),
    "cls_empty_file": ("cls", [], [], ["the file is empty", "no rows"]),
    "cls_empty_parquet_split": ("cls", pa.table({"image": pa.array([], pa.string()), "label": pa.array([], pa.string())}),
                                [], ["split 'train' is empty"]),
    "cls_wrong_flag_column": ("cls", cls(), ["--label-column", "kind"], ["no column 'kind'", "--label-column"]),
    # VQA
    "vqa_missing_image_column": ("vqa", [{"question": "q?", "answers": "a"}] * 4, [],
                                 ["no column 'image'", "--image-column"]),
    "vqa_missing_question_column": ("vqa", [{"image": "ok.png", "answers": "a"}] * 4, [],
                                    ["no column 'question'", "--question-column"]),
    "vqa_missing_answer_column": ("vqa", [{"image": "ok.png", "question": "q?"}] * 4, [],
                                  ["no column 'answer'", "--answer-column"]),
    "vqa_question_integers": ("vqa", qa(question=3), [], ["'question' holds whole numbers", "--question-column"]),
    "vqa_question_lists": ("vqa", qa(question=["q?"]), [], ["'question' holds lists of text", "--question-column"]),
    "vqa_answer_integers": ("vqa", qa(answers=2), [], ["'answers' holds whole numbers", "--answer-column"]),
    "vqa_answer_integer_lists": ("vqa", qa(answers=[2, 3]), [], ["'answers' holds lists of whole numbers",
                                                                  "--answer-column"]),
    "vqa_one_question_a_number": ("vqa", qa(n=3) + qa(question=5, n=1) + qa(n=2), [],
                                  ["'question' holds values of different kinds from row to row (row 4 holds a number; "
                                   "most rows hold a string)", "--question-column"]),
    "vqa_one_answer_list_of_numbers": ("vqa", qa(answers=["a"], n=2) + qa(answers=[3], n=1), [],
                                       ["(row 3 holds a list holding a number; most rows hold a list holding a string)"]),
    "vqa_questions_all_null": ("vqa", qa(question=None), [], ["'question' is null in every row", "--question-column"]),
    "vqa_images_all_null": ("vqa", qa(image=None), [], ["'image' is null in every row", "--image-column"]),
    "vqa_images_all_unreadable_bytes": ("vqa", pa.table({"image": [{"bytes": b"junk", "path": None}] * 4,
                                                         "question": ["q?"] * 4, "answers": ["a"] * 4}), [],
                                        ["unreadable_image=4", "--max-bad-fraction"]),
    "vqa_image_bytes_base64_text": ("vqa", qa(image={"bytes": "iVBORw0KGgo=", "path": None}), [],
                                    ["'image' holds {\"bytes\": text", "binary data", "file path"]),
    "vqa_image_bytes_a_number": ("vqa", qa(image={"bytes": 5}), [], ["'image' holds {\"bytes\": whole numbers"]),
    "vqa_questions_all_blank": ("vqa", qa(question="   "), [], ["empty_question=4", "--max-bad-fraction"]),
    "vqa_answers_all_blank": ("vqa", qa(answers=["", " "]), [], ["empty_answer=4", "--max-bad-fraction"]),
    "vqa_empty_file": ("vqa", [], [], ["the file is empty"]),
    "vqa_empty_parquet_split": ("vqa", pa.table({"image": pa.array([], pa.string()),
                                                 "question": pa.array([], pa.string()),
                                                 "answers": pa.array([], pa.string())}), [], ["split 'train' is empty"]),
}


def flags_to_kwargs(flags: list[str]) -> dict[str, str]:
    return {flags[i].lstrip("-").replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_dataset_raises_dataset_error_naming_the_fix(case, tmp_path):
    task, rows, flags, fragments = CASES[case]
    path = write_source(tmp_path, case, rows)
    loader = load_image_classification if task == "cls" else load_vqa
    with pytest.raises(DatasetError) as info:
        loader(path, "train", cache_dir=str(tmp_path / "cache"), **flags_to_kwargs(flags))
    message = str(info.value)
    assert str(path) in message and all(f in message for f in fragments), message


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_dataset_through_cli_is_one_line(case, tmp_path, capsys):
    task, rows, flags, fragments = CASES[case]
    path = write_source(tmp_path, case, rows)
    stage = ["pretrain-vit"] if task == "cls" else ["train-vqa", "--vit", "vit-tiny"]
    code = main([*stage, "--dataset", str(path), *flags, "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
                 "--no-progress", "--mixed-precision", "no"])
    err = capsys.readouterr().err
    assert code == 2, err
    # stderr may also hold datasets' progress bars; the error itself is one line, the last one.
    errors = [line for line in err.splitlines() if line.startswith("mmfusion: error: ")]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]) and "Traceback" not in err, err
    assert all(f in errors[0] for f in fragments), err


# ---- a few bad rows among good ones: skipped and counted ----------------------------------------

GOOD = [{"image": "ok.png", "label": "red"}, {"image": "ok.png", "label": "blue"}] * 4


@pytest.mark.parametrize("bad_row, reason", [
    ({"image": None, "label": "red"}, "missing_image"),
    ({"image": "gone.png", "label": "red"}, "missing_image"),
    ({"image": "broken.png", "label": "red"}, "unreadable_image"),
    ({"image": "ok.png", "label": None}, "missing_label"),
    ({"image": "ok.png", "label": " "}, "missing_label"),
])
def test_a_bad_row_among_good_ones_is_skipped_and_counted(bad_row, reason, tmp_path):
    path = write_source(tmp_path, "mixed", GOOD + [bad_row])
    ds, report = load_image_classification(path, "train", max_bad_fraction=0.2, cache_dir=str(tmp_path / "c"))
    assert (report.total, report.kept, report.skipped) == (9, 8, {reason: 1})
    assert len(ds) == 8 and ds.features["label"].names == ["blue", "red"]
    with pytest.raises(DatasetError, match=r"11\.1% of the rows are bad.*--max-bad-fraction"):
        load_image_classification(path, "train", max_bad_fraction=0.1, cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize("case", ["truncated_jpeg_rows", "png_corrupt_exif", "png_ztxt_bomb"])
def test_an_image_that_opens_but_does_not_decode_is_skipped_and_counted(case, tmp_path, bad_image_files):
    """verify() passed a JPEG whose pixel rows are cut off: counted good, it crashed the feature cache."""
    (tmp_path / "bad.img").write_bytes(bad_image_files[case])
    path = write_source(tmp_path, "mixed", GOOD + [{"image": "bad.img", "label": "red"}])
    ds, report = load_image_classification(path, "train", max_bad_fraction=0.2, cache_dir=str(tmp_path / "c"))
    assert report.skipped == {"unreadable_image": 1} and len(ds) == 8
    assert all(image.size == (8, 8) for image in ds["image"])  # every kept row decodes


def test_a_truncated_jpeg_row_is_skipped_when_training(tmp_path, bad_image_files, capsys):
    """Through train-vqa with the frozen ViT's feature cache, which the row used to crash."""
    (tmp_path / "cut.jpg").write_bytes(bad_image_files["truncated_jpeg_rows"])
    rows = [{"image": "ok.png", "question": "what color?", "answers": ["red"]}] * 9
    path = write_source(tmp_path, "vqa", [*rows, {"image": "cut.jpg", "question": "what color?", "answers": ["red"]}])
    code = main(["train-vqa", "--vit", "vit-tiny", "--dataset", str(path), "--output-dir", str(tmp_path / "out"),
                 "--max-steps", "1", "--batch-size", "4", "--no-progress", "--mixed-precision", "no",
                 "--max-bad-fraction", "0.2", "--final-eval-limit", "2", "--holdout", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "kept 9 of 10 rows, skipped 1 (unreadable_image=1)" in captured.out + captured.err


def test_an_image_over_the_pixel_limit_is_skipped_as_unreadable(tmp_path, monkeypatch):
    Image.new("RGB", (20, 20)).save(tmp_path / "huge.png")
    path = write_source(tmp_path, "bomb", GOOD + [{"image": "huge.png", "label": "red"}])
    monkeypatch.setattr(processing, "MAX_IMAGE_PIXELS", 100)
    _, report = load_image_classification(path, "train", max_bad_fraction=0.2, cache_dir=str(tmp_path / "c"))
    assert report.skipped == {"unreadable_image": 1}


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_impossible_bad_fraction_raises(fraction, tmp_path):
    path = write_source(tmp_path, "good", GOOD)
    with pytest.raises(DatasetError, match=r"max_bad_fraction must be in \[0, 1\]"):
        load_image_classification(path, "train", max_bad_fraction=fraction)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 2**20])
def test_a_line_that_is_not_utf8_is_named(tmp_path, chunk):
    """pyarrow read such a file and failed at the first access to the row, a traceback."""
    from mmfusion.data.json_files import check_utf8

    path = tmp_path / "bad.jsonl"
    good = json.dumps({"image": "ok.png", "question": "é?", "answers": ["ü"]}, ensure_ascii=False) + "\n"
    path.write_bytes(good.encode() * 3 + b'{"image": "ok.png", "question": "what\xff?"}\n')
    offset = len(good.encode()) * 3 + len(b'{"image": "ok.png", "question": "what')
    with pytest.raises(DatasetError, match=rf"line 4 is not UTF-8 text \(byte {offset}: invalid start byte\)"):
        check_utf8(path, chunk)


def test_a_dataset_line_that_is_not_utf8_through_cli_is_one_line(tmp_path, capsys):
    path = write_source(tmp_path, "vqa", [{"image": "ok.png", "question": "what?", "answers": ["red"]}] * 4)
    path.write_bytes(path.read_bytes() + b'{"image": "ok.png", "question": "\xc3(", "answers": ["red"]}\n')
    code = main(["train-vqa", "--vit", "vit-tiny", "--dataset", str(path), "--output-dir", str(tmp_path / "out"),
                 "--no-progress", "--mixed-precision", "no"])
    err = capsys.readouterr().err
    assert code == 2 and "line 5 is not UTF-8 text" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, text, line", [
    ("rows.jsonl", "null\n", 1), ("rows.jsonl", "\n\nnull\n{\"image\": \"ok.png\"}\n", 3), ("rows.json", " null ", 1),
    ("rows.jsonl", "7\n", 1), ("rows.json", "\n[1, 2, 3]", 2), ("rows.json", '[ "a", {"image": "ok.png"}]', 1)])
def test_a_file_that_starts_with_no_json_object_is_named_not_crashed_on(name, text, line, tmp_path, capsys):
    """`datasets`' JSON reader kills the process (a segmentation fault) on a leading null."""
    (tmp_path / "ok.png").write_bytes(png())
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DatasetError, match=f"line {line} is '.*', not a JSON object"):
        load_vqa(str(path), "train")
    code = main(["train-vqa", "--vit", "vit-tiny", "--dataset", str(path), "--output-dir", str(tmp_path / "out"),
                 "--no-progress", "--mixed-precision", "no"])
    err = capsys.readouterr().err
    assert code == 2 and "not a JSON object" in err and "Traceback" not in err, err


GOOD_LINE = json.dumps({"image": "ok.png", "question": "what color?", "answers": ["red"]})


@pytest.mark.parametrize("name, text, message", [
    ("rows.jsonl", f"{GOOD_LINE}\n" * 3 + '{"image": "ok.png", "question": \n',
     r"line 4 is not valid JSON \(Expecting value at column 33\)"),
    ("rows.jsonl", f"{GOOD_LINE}\n" * 2 + "[1, 2]\n" + f"{GOOD_LINE}\n", "line 3 is a list, not a JSON object"),
    ("rows.jsonl", "[1, 2]\n" + f"{GOOD_LINE}\n" * 2, r"line 1 is (a list|'\[1, 2\]'), not a JSON object"),
    ("rows.json", f"[{GOOD_LINE},\n\"red\"]", "item 2 of the list is a string, not a JSON object"),
    ("rows.json", f"[{GOOD_LINE},\n{GOOD_LINE}\n", r"line 3 is not valid JSON \(Expecting ',' delimiter"),
    ("rows.json", "[1, 2]\n" + f"{GOOD_LINE}\n", r"line 1 is (a list|'\[1, 2\]'), not a JSON object"),
    ("rows.json", "[]\n", "it holds no rows"),  # was "Instruction 'train' corresponds to no data!"
])
def test_a_json_line_datasets_cannot_read_is_named(name, text, message, tmp_path):
    """`datasets` said only "An error occurred while generating the dataset", and logged the
    reader's error on stderr besides."""
    (tmp_path / "ok.png").write_bytes(png())
    (tmp_path / name).write_text(text)
    with pytest.raises(DatasetError, match=f"{name}: {message}"):
        load_vqa(str(tmp_path / name), "train")
    folder = tmp_path / "data"  # in a folder of files: the same line, named with its file
    folder.mkdir()
    (folder / "ok.png").write_bytes(png())
    (folder / f"train{Path(name).suffix}").write_text(text)
    with pytest.raises(DatasetError, match=f"train{Path(name).suffix}: .*{message}"):
        load_vqa(str(folder), "train")


@pytest.mark.parametrize("where", ["folder", "file"])
def test_a_json_file_of_one_object_is_no_rows_and_is_not_called_invalid(where, tmp_path):
    """A valid pretty-printed info.json beside the data was reported as "line 1 is not valid JSON";
    in a folder, every .json file is read as rows, which the error now says."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png())
    (folder / "rows.jsonl").write_text(f"{GOOD_LINE}\n" * 4)
    (folder / "info.json").write_text('{\n  "name": "my set",\n  "rows": 4\n}\n')
    if where == "file":
        (folder / "rows.jsonl").unlink()
        (folder / "info.json").write_text('[1, 2]\n{"name": "my set"}\n')  # a list, then more: JSON lines
    message = ("info.json: it holds one JSON document, an object, not rows .*every .json and .jsonl file in a "
               "--dataset folder is read as rows: move it out" if where == "folder" else
               "info.json: line 1 is a list, not a JSON object")
    with pytest.raises(DatasetError, match=message):
        load_vqa(str(folder), "train")


def test_a_bad_json_line_through_the_command_is_one_line_on_stderr(tmp_path):
    """The whole stderr of the command, in a process of its own: `datasets`' loggers printed the
    reader's error twice (their handler, and the root's) before mmfusion's error."""
    import os
    import subprocess
    import sys

    (tmp_path / "ok.png").write_bytes(png())
    (tmp_path / "rows.jsonl").write_text(f"{GOOD_LINE}\n{{\"image\": \n")
    result = subprocess.run([sys.executable, "-m", "mmfusion.cli", "train-vqa", "--vit", "vit-tiny", "--dataset",
                             str(tmp_path / "rows.jsonl"), "--output-dir", str(tmp_path / "out"), "--no-progress"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "rows.jsonl: line 2 is not valid JSON" in lines[0] and "fix or remove that line" in lines[0]


@pytest.mark.parametrize("kind", ["fifo", "device", "empty name"])
def test_a_dataset_path_that_is_no_file_or_folder_is_named(kind, tmp_path):
    import os

    source = {"fifo": str(tmp_path / "rows.jsonl"), "device": os.devnull, "empty name": ""}[kind]
    if kind == "fifo":
        os.mkfifo(source)
    with pytest.raises(DatasetError, match="not a regular file or folder" if kind != "empty name" else "name is empty"):
        load_vqa(source, "train")


@pytest.mark.parametrize("split", ["", "a/b", "train test"])
def test_a_split_that_is_no_split_name_is_named(split, tmp_path):
    path = write_source(tmp_path, "vqa", qa())
    with pytest.raises(DatasetError, match=f"'{split}' is not a split name .* pass one with --split"):
        load_vqa(str(path), split)


@pytest.mark.parametrize("split, rows", [("train[:2]", 2), ("train+test", 8), ("test[50%:]", 2)])
def test_split_slices_and_sums_still_load_from_a_folder(split, rows, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("train", "test"):
        write_source(folder, name, qa())
    dataset, _ = load_vqa(str(folder), split)
    assert len(dataset) == rows


def test_a_folder_without_the_evaluation_split_names_the_flag_that_picks_another(tmp_path):
    """The default --eval-split test of a train/validation folder said "pass one of those as the split"."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("train", "validation"):
        write_source(folder, name, qa())
    with pytest.raises(DatasetError, match=r"Unknown split \"test\".*\['train', 'validation'\]\. Pass one of those "
                                           r"with --eval-split or --train-split \(training\), or --split"):
        load_vqa(str(folder), "test")


def test_save_to_disk_folders_load_as_datasets(tmp_path):
    """A Dataset.save_to_disk folder ("use load_from_disk" before) is one split, as a single file
    is; a DatasetDict's has its splits; both with an Image column holding the pixels."""
    import datasets

    from mmfusion.data import load_vqa

    images = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(4)]
    rows = {"image": images, "question": ["what?"] * 4, "answers": [["red"]] * 4}
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answers": datasets.Sequence(datasets.Value("string"))})
    one = datasets.Dataset.from_dict(rows, features=features)
    one.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": one, "validation": one.select([0, 1])}).save_to_disk(str(tmp_path / "two"))
    ds, report = load_vqa(str(tmp_path / "one"), "train")
    assert report.kept == 4 and ds[3]["image"].getpixel((0, 0)) == (120, 0, 0)
    ds, report = load_vqa(str(tmp_path / "two"), "validation")
    assert report.kept == 2
    with pytest.raises(DatasetError, match=r"no split 'test'; it has \['train', 'validation'\]. Pass one of those "
                                           "with --eval-split"):
        load_vqa(str(tmp_path / "two"), "test")
    # slices as `datasets` cuts the splits it loads; they were ignored, so train[:75%] and
    # test[75%:] of a saved Dataset were the same four rows, trained on and scored
    head, _ = load_vqa(str(tmp_path / "one"), "train[:75%]")
    tail, _ = load_vqa(str(tmp_path / "one"), "test[75%:]")
    assert [r["image"].getpixel((0, 0))[0] for r in head] == [0, 40, 80] and len(tail) == 1
    assert len(load_vqa(str(tmp_path / "two"), "validation[:1]")[0]) == 1
    with pytest.raises(DatasetError, match="a saved Dataset has one split; 'train\\+test' joins several parts with \\+"):
        load_vqa(str(tmp_path / "one"), "train+test")


# ---- an image_id column that names several images ------------------------------------------------

@pytest.mark.parametrize("task", ["vqa", "captions"])
def test_an_image_id_shared_by_different_images_is_refused(task, tmp_path):
    """Training trusts the ids: 4 images under id 0 trained on the first one's features alone."""
    from mmfusion.data import load_captions

    for name, color in (("a.png", (200, 0, 0)), ("b.png", (0, 200, 0)), ("a_copy.png", (200, 0, 0))):
        (tmp_path / name).write_bytes(png(color))
    loader = load_vqa if task == "vqa" else load_captions
    text = {"question": "what color?", "answers": ["red"]} if task == "vqa" else {"captions": ["a square"]}

    def load(images_and_ids):
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps({"image": i, "image_id": n, **text}) + "\n" for i, n in images_and_ids))
        return loader(str(path), "train")[0]

    # one id for the same bytes under two names, and several ids for one image, are fine
    assert len(load([("a.png", 0), ("a_copy.png", 0), ("a.png", 1), ("b.png", 2)])) == 4
    with pytest.raises(DatasetError, match=r"column 'image_id' gives id 0 to different images \('.*a\.png' and "
                                           r"'.*b\.png'\).*Correct the column .* or drop it"):
        load([("a.png", 0), ("a_copy.png", 0), ("b.png", 0), ("b.png", 1)])


def test_integer_labels_past_a_million_classes_are_refused_and_sparse_slices_load(tmp_path):
    """One label 2,000,000 among 0, 1, 2 made 2,000,001 classes (33 s, 1.5 GB); timestamps, no memory left."""
    def load(labels):
        path = write_source(tmp_path, "cls", [{"image": "ok.png", "label": n} for n in labels])
        return load_image_classification(path, "train")[0].features["label"].num_classes

    assert load((0, 1, 3)) == 4  # a few unused ids still load
    # an evaluation file or slice of a large label set holds few of its ids (matched by name later)
    assert load((1400, 1203, 7, 999)) == 1401
    with pytest.raises(DatasetError, match=r"integer labels up to 1048576 \(4 distinct.*write them as strings"):
        load((0, 1, 2, 2**20))


def test_a_folder_read_as_an_image_folder_says_why_its_data_file_was_ignored(tmp_path):
    """It said only "no column 'question'; the columns are ['image']"."""
    photos = tmp_path / "js" / "train" / "photos"
    photos.mkdir(parents=True)
    for i in range(2):
        (photos / f"{i}.png").write_bytes(png((100 * i, 0, 0)))
    data = tmp_path / "js" / "train" / "data.jsonl"
    data.write_text("".join(json.dumps({"image": f"photos/{i}.png", "question": "q?", "answers": "a"}) + "\n"
                            for i in range(2)))
    with pytest.raises(DatasetError, match=r"no column 'question'; the columns are \['image'\]: .* read as an image "
                                           r"folder .*Move the images out of the split folders, or point --dataset "
                                           rf"at a data file such as {data}$"):
        load_vqa(str(tmp_path / "js"), "train")
    assert len(load_vqa(str(data), "train")[0]) == 2


@pytest.mark.parametrize("task, ids, message", [
    ("vqa", pa.array([2**63 + 5] * 4, pa.uint64()), "holds 9223372036854775813, past the 64-bit signed integer range"),
    ("captions", pa.array([2**63 - 1, None, None, None], pa.int64()), "too close to the 64-bit signed integer limit "
                                                                      "to number 4 rows after it"),
    ("captions", pa.array([2**63 - 5, None, None, None], pa.int64()), None)])  # 2**63-4 .. 2**63-1: they fit
def test_an_image_id_past_int64_is_refused_not_a_traceback(task, ids, message, tmp_path):
    """An OverflowError traceback from the loader's map (uint64 ids), or from numbering the rows
    without an id past the largest (caption data)."""
    from mmfusion.data import load_caption_dataset

    text = {"question": ["q?"] * 4, "answers": [["red"]] * 4} if task == "vqa" else {"caption": ["a red square"] * 4}
    path = write_source(tmp_path, "ids", pa.table({"image": ["ok.png"] * 4, **text, "image_id": ids}))
    load = load_vqa if task == "vqa" else load_caption_dataset
    if message is None:
        ds, _ = load(str(path), "train")
        assert len(ds) == 4 and max(ds["image_id"]) == 2**63 - 1
    else:
        with pytest.raises(DatasetError, match=message):
            load(str(path), "train")


def test_explain_json_failure_names_a_key_repeated_in_one_object(tmp_path):
    """`datasets`' reader fails on it ("Column(/question) was specified twice"); json.loads keeps
    the last value silently, so the explanation checks for it."""
    from mmfusion.data.json_files import explain_json_failure

    path = tmp_path / "rows.jsonl"
    path.write_text(f"{GOOD_LINE}\n" + '{"image": "ok.png", "question": "a?", "question": "b?", "answers": ["x"]}\n')
    assert explain_json_failure(path) == "line 2: key 'question' appears twice in one object; fix that line"
    path.write_text(f"{GOOD_LINE}\n" * 2)
    assert explain_json_failure(path) is None


@pytest.mark.parametrize("odd, message", [(b"a\nb.png", "holds a line break, which datasets leaves out"),
                                          (b"bad\xff\xfe.png", "is not UTF-8 text, which datasets cannot read")])
def test_an_image_folder_file_name_datasets_cannot_read_is_named(odd, message, tmp_path):
    """A name with a line break was left out silently ('kept 6 of 6' for 7 files); one not UTF-8
    ended in a UnicodeEncodeError naming no file."""
    import os

    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "images" / label / f"{i}.png").write_bytes(png())
    try:
        (tmp_path / "images" / "cat" / os.fsdecode(odd)).write_bytes(png())
    except OSError:
        pytest.skip("this file system refuses such a name")
    with pytest.raises(DatasetError, match=message):
        load_image_classification(str(tmp_path / "images"), "train")
