"""Evaluation rows are not training rows: a single file's split is held out by image (by
default), --eval-dataset names other data (classes matched by name), --holdout 0 evaluates on
the training rows only knowingly, with a warning. The training file named another way (./x, a link)
is the training data all the same."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from PIL import Image

from mmfusion.config import ConfigError
from mmfusion.data import DatasetError, load_image_classification, load_vqa
from mmfusion.data.splits import align_labels, hold_out, same_rows, single_split
from mmfusion.training import pretrain_vit, train_vqa

QUIET = ["--no-progress", "--mixed-precision", "no", "--max-steps", "1", "--batch-size", "4"]
TINY = ["--image-size", "16", "--patch-size", "4", "--n-layer", "1", "--n-head", "2", "--n-embd", "16"]


def vqa_file(folder: Path, images: int, questions: int = 3, name: str = "qa.jsonl") -> Path:
    rows = []
    for i in range(images):
        Image.new("RGB", (16, 16), (10 * i, 0, 0)).save(folder / f"img{i}.png")
        rows += [{"image": f"img{i}.png", "question": f"q{j}?", "answers": [f"a{i}"]} for j in range(questions)]
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cls_file(folder: Path, labels: list[str], name: str) -> Path:
    rows = []
    for i, label in enumerate(labels):
        Image.new("RGB", (16, 16), (0, 20 * i, 0)).save(folder / f"{name}{i}.png")
        rows.append({"image": f"{name}{i}.png", "label": label})
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_which_sources_reuse_the_training_rows(tmp_path):
    path = vqa_file(tmp_path, 2)
    assert single_split(str(path)) and not single_split("easy-vqa") and not single_split("scenes")
    assert same_rows(str(path), "train", None, "test")  # a file is one split, whatever the names
    assert not same_rows(str(path), "train", str(tmp_path / "other.jsonl"), "test")
    assert not same_rows("easy-vqa", "train", None, "test") and same_rows("easy-vqa", "train", None, "train")


def test_holdout_takes_whole_images_and_depends_on_the_data_only(tmp_path):
    ds, _ = load_vqa(str(vqa_file(tmp_path, 20)), "train")
    train, held = hold_out(ds, 0.1, "qa")
    images = lambda d: {row["image"].getpixel((0, 0)) for row in d}  # noqa: E731 -- the image's color is its name
    assert len(images(held)) == 2 and len(held) == 6 and len(train) == 54
    assert not images(held) & images(train)  # no image on both sides
    shuffled = ds.shuffle(seed=7)
    assert images(hold_out(shuffled, 0.1, "qa")[1]) == images(held)  # not the row order, not a seed
    with pytest.raises(DatasetError, match="1 distinct image.*--eval-dataset, or pass --holdout 0"):
        hold_out(ds.filter(lambda r: r["answers"] == ["a0"]), 0.1, "qa")


def test_holdout_tells_images_apart_by_their_bytes_not_a_shared_file_name(tmp_path):
    """A parquet file may store different images under one file name: they are still 20 images
    (the name alone made them one, and the hold-out was refused)."""
    import io

    import numpy as np

    rows = []
    for i in range(20):
        png = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(png, format="PNG")
        rows.append({"image": {"bytes": png.getvalue(), "path": "image.png"}, "question": "q?", "answers": ["a"]})
    datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "qa.parquet"))
    ds, _ = load_vqa(str(tmp_path / "qa.parquet"), "train")
    train, held = hold_out(ds, 0.1, "qa")
    assert (len(train), len(held)) == (18, 2)


def test_holdout_is_the_same_wherever_the_files_sit_and_keeps_a_copied_picture_on_one_side(tmp_path):
    """Keys come from the files' bytes, not their paths: the same data cloned into another folder
    holds out the same images, and one picture saved under two names is one image."""
    import shutil

    (tmp_path / "a").mkdir()
    vqa_file(tmp_path / "a", 20)
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    color = lambda d: {row["image"].getpixel((0, 0)) for row in d}  # noqa: E731 -- the image's color is its name
    held_a = hold_out(load_vqa(str(tmp_path / "a" / "qa.jsonl"), "train")[0], 0.1, "qa")[1]
    held_b = hold_out(load_vqa(str(tmp_path / "elsewhere" / "b" / "qa.jsonl"), "train")[0], 0.1, "qa")[1]
    assert len(color(held_a)) == 2 and color(held_a) == color(held_b)

    copies = tmp_path / "copies"
    copies.mkdir()
    rows = []
    for i in range(10):
        Image.new("RGB", (16, 16), (10 * i, 0, 0)).save(copies / f"img{i}.png")
        shutil.copy(copies / f"img{i}.png", copies / f"again{i}.png")  # the same picture under a second name
        rows += [{"image": f"img{i}.png", "question": "q?", "answers": ["a"]},
                 {"image": f"again{i}.png", "question": "q?", "answers": ["a"]}]
    (copies / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held = hold_out(load_vqa(str(copies / "qa.jsonl"), "train")[0], 0.2, "qa")
    assert len(held) == 4 and not color(held) & color(train)  # 2 of 10 pictures, both names of each


def test_image_keys_of_paths_no_loader_checked_do_not_open_a_pipe(tmp_path):
    import os

    from mmfusion.data.splits import image_keys

    os.mkfifo(tmp_path / "pipe.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "real.png")
    (tmp_path / "folder.png").mkdir()
    rows = datasets.Dataset.from_dict({"image": [str(tmp_path / "pipe.png"), str(tmp_path / "missing.png"),
                                                 str(tmp_path / "folder.png"), str(tmp_path / "real.png")]})
    open_files = len(os.listdir("/proc/self/fd"))
    keys = image_keys(rows)  # reading the pipe would wait forever for a writer
    assert keys[:3] == [f"path:{tmp_path / n}" for n in ("pipe.png", "missing.png", "folder.png")]
    assert keys[3].startswith("sha256:") and len(os.listdir("/proc/self/fd")) == open_files  # none left open


def test_questions_and_captions_hold_out_the_same_images_where_they_cover_different_ones(tmp_path):
    """Chosen per kind, an image missing from one kind moved the other kind's cut: 20 images with
    questions and 19 with captions held out {7, 11} and {11, 13}, so image 13's questions were
    trained on while its caption was scored."""
    from mmfusion.data.splits import held_out_digest, hold_out_all, image_keys

    paths = []
    for i in range(20):
        Image.new("RGB", (8, 8), (10 * i, 5, 0)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    questions = datasets.Dataset.from_dict({"image": paths, "question": ["q?"] * 20})
    first_held = set(image_keys(hold_out(questions, 0.1, "qa")[1]))
    lowest = next(p for p in paths if image_keys(datasets.Dataset.from_dict({"image": [p]}))[0] in first_held)
    captions = datasets.Dataset.from_dict({"image": [p for p in paths if p != lowest], "caption": ["c"] * 19})
    ((q_kept, q_held), none, (c_kept, c_held)), digest = hold_out_all([questions, None, captions], 0.1, "data")
    assert none == (None, None)
    keys = lambda d: set(image_keys(d))  # noqa: E731
    assert not keys(q_kept) & keys(c_held) and not keys(c_kept) & keys(q_held)  # no image on both sides
    assert keys(c_held) <= keys(q_held) and len(keys(q_held)) == 2
    assert digest == held_out_digest(keys(q_held) | keys(c_held))  # names the held images, every kind
    with pytest.raises(DatasetError, match="none of its images is among the 2 held-out"):
        hold_out_all([questions, captions.select([0])], 0.1, "data")  # one captioned image, trained on
    # captions that only align (--task vqa --align-epochs) are never scored: they need no held rows
    ((_, _), (aligning, none_held)), _ = hold_out_all([questions, captions.select([0])], 0.1, "data",
                                                      scored=[True, False])
    assert len(aligning) == 1 and len(none_held) == 0


def test_image_keys_see_a_file_rewritten_with_its_size_and_time_kept(tmp_path):
    """Digests are remembered per file version; `cp -p` or `rsync -a` keep size and mtime, so the
    version includes the inode change time too. A stale digest would give the file another
    image's features."""
    import os

    from mmfusion.data.splits import image_keys

    path = tmp_path / "a.png"
    path.write_bytes(b"x" * 100)
    rows = datasets.Dataset.from_dict({"image": [str(path)]})
    before, st = image_keys(rows), path.stat()
    path.write_bytes(b"y" * 100)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert image_keys(rows) != before


def test_classes_of_other_data_are_matched_by_name(tmp_path):
    train, _ = load_image_classification(str(cls_file(tmp_path, ["cat", "dog", "emu"] * 2, "train")), "train")
    other, _ = load_image_classification(str(cls_file(tmp_path, ["emu", "cat"], "other")), "train")
    assert other.features["label"].names == ["cat", "emu"]  # its own ids: emu would be 1, dog's id
    aligned = align_labels(other, train.features["label"].names, "other")
    assert aligned.features["label"].names == ["cat", "dog", "emu"] and aligned["label"] == [2, 0]
    stranger, _ = load_image_classification(str(cls_file(tmp_path, ["cat", "yak"], "stranger")), "train")
    with pytest.raises(DatasetError, match=r"classes the training data lacks: \['yak'\]"):
        align_labels(stranger, train.features["label"].names, "stranger")


def test_a_single_file_is_evaluated_on_held_out_images(tmp_path, capsys):
    path = vqa_file(tmp_path, 20)
    metrics = train_vqa.run(*train_vqa.parse(["--vit", "vit-tiny", "--dataset", str(path), "--output-dir",
                                              str(tmp_path / "out"), *QUIET]))
    out = capsys.readouterr().out
    assert "evaluation: 6 of the 60 rows of" in out and "held out of training by image (--holdout 0.1; images " in out
    assert metrics["count"] == 6 and "held out" in metrics["evaluation"]
    assert "fewer than the 18 images caching" in out  # training saw the rows of the other 18 images only


def image_folder(root: Path, classes: int = 2, per_class: int = 10) -> Path:
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), (20 * i, 100 * c, 0)).save(root / f"class{c}" / f"{i}.png")
    return root


def test_a_folder_of_class_subfolders_alone_is_one_split_held_out_by_image(tmp_path, capsys):
    """README's `mmfusion pretrain-vit --dataset my_images/`: with no train/ and test/ inside,
    `datasets` finds one split, and asking it for "test" failed ("Unknown split")."""
    from mmfusion.data.local import as_only_split, unsplit_folder

    folder = image_folder(tmp_path / "my_images")
    split_folder = tmp_path / "split"
    for split in ("train", "test"):
        image_folder(split_folder / split)
    named = tmp_path / "named"  # train/ alone: a split by name, so "test" is not there
    image_folder(named / "train")
    assert unsplit_folder(folder) and not unsplit_folder(split_folder) and not unsplit_folder(named)
    assert single_split(str(folder)) and not single_split(str(split_folder)) and not single_split(str(named))
    with pytest.raises(DatasetError, match="Unknown split"):
        load_image_classification(str(named), "test")
    assert as_only_split("test[:5]", "train") == "train[:5]" and as_only_split("validation", "train") == "train"
    with pytest.raises(DatasetError, match=r"name no split, so it has one; 'train\+test' joins several parts"):
        load_image_classification(str(folder), "train+test")  # would give every row twice
    assert same_rows(str(folder), "train", None, "test") and same_rows(str(folder), "train", None, "test[:5]")
    assert not same_rows(str(folder), "train[:80%]", None, "train[80%:]")  # slices the user chose
    assert not same_rows(str(folder), "train[:8]", None, "test[8:10]")
    assert same_rows(str(folder), "train[:80%]", None, "test[0%:80%]")  # the same rows spelled otherwise
    assert same_rows(str(folder), "train[:90%]", None, "test[80%:]")  # overlapping
    assert same_rows(str(folder), "train[:8]", None, "test[80%:]")  # rows and percent: unknown, so held out
    assert same_rows(str(folder), "train[:-2]", None, "test[-2:]")  # negative bounds: likewise
    card = image_folder(tmp_path / "card")  # a README whose configs may name splits: datasets decides
    (card / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files: class0/*\n---\n# card\n")
    assert not unsplit_folder(card)
    (card / "README.md").write_text("---\nlicense: mit\n---\n# a card without configs\n")
    assert unsplit_folder(card)
    test_rows, _ = load_image_classification(str(folder), "test[:5]")  # the one split, as a single file gives
    assert len(test_rows) == 5

    metrics = pretrain_vit.run(*pretrain_vit.parse(["--dataset", str(folder), "--output-dir", str(tmp_path / "vit"),
                                                    *TINY, *QUIET]))
    assert "evaluation: 2 of the 20 rows of" in capsys.readouterr().out and metrics["test_examples"] == 2
    pretrain_vit.run(*pretrain_vit.parse(["--dataset", str(folder), "--holdout", "0", "--output-dir",
                                          str(tmp_path / "vit0"), *TINY, *QUIET]))
    assert "WARNING: evaluating on the training rows" in capsys.readouterr().out


def test_slices_of_a_single_file_are_the_rows_asked_for(tmp_path, capsys):
    path = vqa_file(tmp_path, 10, questions=1)
    head, _ = load_vqa(str(path), "train[:80%]")
    tail, _ = load_vqa(str(path), "test[80%:]")  # the name does not matter in a file of one split
    assert (len(head), len(tail)) == (8, 2)
    with pytest.raises(DatasetError, match="a single file has one split; 'train\\+test' joins several parts"):
        load_vqa(str(path), "train+test")
    metrics = train_vqa.run(*train_vqa.parse(["--vit", "vit-tiny", "--dataset", str(path), "--train-split",
                                              "train[:80%]", "--eval-split", "train[80%:]", "--output-dir",
                                              str(tmp_path / "out"), *QUIET]))
    assert metrics["count"] == 2 and metrics["evaluation"] == f"evaluation: {path} [train[80%:]]"
    assert "held out" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_resume_whose_held_out_images_changed_warns(tmp_path, capsys):
    """A checkpoint records the evaluation line, whose digest names the held-out images: data
    changed between the runs (or a change in how images are keyed) would otherwise resume a run
    that may be scored on images it trained on, without a word."""
    path = vqa_file(tmp_path, 20)
    out = str(tmp_path / "out")
    args = ["--vit", "vit-tiny", "--dataset", str(path), "--output-dir", out, "--save-every", "1", *QUIET]
    train_vqa.run(*train_vqa.parse(args))
    first = capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "checkpoints" / "step_1" / "progress.json").read_text())
    digest = saved["data"]["held_out_images"]
    assert f"(--holdout 0.1; images {digest})" in first
    # the same data spelled another way, and the default fraction named: the same images
    respelled = ["--dataset", f"{tmp_path}/./{path.name}", "--holdout", "0.1"]
    train_vqa.run(*train_vqa.parse([*args, *respelled, "--max-steps", "2", "--resume", "latest"]))
    assert "resumed from" in (again := capsys.readouterr().out) and "holds out other images" not in again
    vqa_file(tmp_path, 30)  # ten more images: another held-out set
    train_vqa.run(*train_vqa.parse([*args, "--max-steps", "3", "--resume", "latest"]))
    printed = capsys.readouterr().out
    assert f"WARNING: this run holds out other images than the checkpoint's run (held-out images {digest}, now" in printed
    # the answers' tokens changed with the data: the LM head scores other tokens, which is named, not refused
    assert "note: the output vocabulary (--output-vocab, from the training targets): " in printed


def test_holdout_zero_warns_and_eval_dataset_is_used(tmp_path, capsys):
    path = vqa_file(tmp_path, 4)
    train_vqa.run(*train_vqa.parse(["--vit", "vit-tiny", "--dataset", str(path), "--holdout", "0",
                                    "--output-dir", str(tmp_path / "a"), *QUIET]))
    assert "WARNING: evaluating on the training rows" in capsys.readouterr().out
    other = vqa_file(tmp_path, 2, questions=1, name="other.jsonl")
    metrics = train_vqa.run(*train_vqa.parse(["--vit", "vit-tiny", "--dataset", str(path), "--eval-dataset",
                                              str(other), "--output-dir", str(tmp_path / "b"), *QUIET]))
    assert metrics["count"] == 2 and metrics["evaluation"] == f"evaluation: {other} [test]"
    with pytest.raises(ConfigError, match="--holdout and --eval-dataset both choose"):
        train_vqa.parse(["--eval-dataset", str(other), "--holdout", "0.2"])


def test_pretrain_vit_scores_other_data_by_class_name(tmp_path, capsys):
    train = cls_file(tmp_path, ["cat", "dog", "emu"] * 4, "train")
    other = cls_file(tmp_path, ["emu", "cat"], "other")
    metrics = pretrain_vit.run(*pretrain_vit.parse(["--dataset", str(train), "--eval-dataset", str(other),
                                                    "--output-dir", str(tmp_path / "vit"), *TINY, *QUIET]))
    assert metrics["test_examples"] == 2 and metrics["classes"] == ["cat", "dog", "emu"]
    assert f"evaluation: {other} [test]" in capsys.readouterr().out
    assert datasets  # the module under test builds on it


def test_eval_warns_when_the_rows_are_the_models_training_rows(tmp_path, capsys):
    from mmfusion.cli import main

    path = vqa_file(tmp_path, 10)
    train_vqa.run(*train_vqa.parse(["--vit", "vit-tiny", "--dataset", str(path), "--output-dir",
                                    str(tmp_path / "out"), *QUIET]))
    capsys.readouterr()
    model = str(tmp_path / "out" / "model")
    assert main(["eval", "--model", model, "--dataset", str(path), "--limit", "2"]) == 0
    assert f"WARNING: {model} was trained on {path} [train]" in capsys.readouterr().out
    other = vqa_file(tmp_path, 2, name="other.jsonl")
    assert main(["eval", "--model", model, "--dataset", str(other), "--limit", "2"]) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_eval_warns_from_another_folder_for_a_run_given_a_relative_dataset(tmp_path, capsys, monkeypatch):
    """The run records the folder it ran from, so a relative --dataset is found from anywhere."""
    from mmfusion.cli import main

    data = tmp_path / "data"
    data.mkdir()
    vqa_file(data, 10)
    monkeypatch.chdir(data)
    train_vqa.run(*train_vqa.parse(["--vit", "vit-tiny", "--dataset", "qa.jsonl", "--output-dir",
                                    str(tmp_path / "out"), *QUIET]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "out" / "model"), "--dataset", str(data / "qa.jsonl"),
                 "--limit", "2"]) == 0
    assert "was trained on qa.jsonl [train]" in capsys.readouterr().out


@pytest.mark.parametrize("spelling", ["./qa.jsonl", "absolute", "link.jsonl", "~/qa.jsonl"])
def test_another_spelling_of_the_training_file_is_still_the_training_rows(tmp_path, monkeypatch, spelling):
    """--eval-dataset naming --dataset's file another way (./x, absolute, a symbolic link, ~) used
    to skip both the holdout and the warning: evaluation silently ran on the training rows."""
    from mmfusion.training.data import evaluation_rows

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    path = vqa_file(tmp_path, 20)
    (tmp_path / "link.jsonl").symlink_to(path)
    other = str(path) if spelling == "absolute" else spelling
    rows, _ = load_vqa("qa.jsonl", "train")
    never = lambda source: pytest.fail(f"{source} was loaded as other data")  # noqa: E731

    (kept,), (held,), loaded, line, record = evaluation_rows("qa.jsonl", "train", other, "test", None, [rows], never)
    assert loaded is None and len(held) == 6 and len(kept) == 54
    assert record == {"held_out_images": line.split("; images ")[1][:12]}
    assert line.startswith("evaluation: 6 of the 60 rows of qa.jsonl held out") and f"--eval-dataset {other} is" in line
    (kept,), held, loaded, line, record = evaluation_rows("qa.jsonl", "train", other, "test", 0.0, [rows],
                                                         lambda s: "loaded")
    assert held is None and record is None and len(kept) == 60 and line.startswith("WARNING: evaluating on the training rows")


def test_sources_compare_as_files_only_when_they_are_local(tmp_path, monkeypatch):
    from mmfusion.data.splits import same_source

    monkeypatch.chdir(tmp_path)
    vqa_file(tmp_path, 1)
    vqa_file(tmp_path, 1, name="copy.jsonl")
    assert same_source("qa.jsonl", str(tmp_path / "qa.jsonl")) and not same_source("qa.jsonl", "copy.jsonl")
    assert same_source("easy-vqa", "easy-vqa") and not same_source("easy-vqa", "./easy-vqa")
    assert not same_source("user/data", "user/data2") and same_source("user/data", "user/data")  # hub ids: strings
