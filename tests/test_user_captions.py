"""Captions from the user's own data: the loader (one caption or several per image, COCO-style
records, bad rows), training rows, caption training and alignment on a file with its images held
out for evaluation, `mmfusion eval` on it, and BLEU-4 / CIDEr-D against the COCO caption
evaluation's own code (pycocoevalcap)."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import datasets
import pytest
from PIL import Image

from mmfusion.cli import main as cli_main
from mmfusion.data import DatasetError, caption_rows, load_caption_dataset, load_captions
from mmfusion.metrics import bleu4, caption_metrics, caption_words, cider_d
from mmfusion.training import train_vqa

QUIET = ["--no-progress", "--mixed-precision", "no", "--batch-size", "4", "--eval-batch-size", "8",
         "--caption-max-new-tokens", "4"]
WORDS = "a red blue circle square at the top left right of image small large two green".split()


def caption_file(folder: Path, images: int, per_image: int = 2, name: str = "caps.jsonl", **extra) -> Path:
    rows = []
    for i in range(images):
        Image.new("RGB", (16, 16), (10 * i, 0, 0)).save(folder / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "captions": [f"shape {i} caption {j}" for j in range(per_image)], **extra})
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- the loader ----------------------------------------------------------------------------


def test_captions_load_as_one_row_per_image_with_every_reference(tmp_path):
    ds, report = load_captions(str(caption_file(tmp_path, 3, per_image=2)), "train")
    assert report.kept == 3 and set(ds.column_names) == {"image", "captions", "image_id"}
    assert ds[1]["captions"] == ["shape 1 caption 0", "shape 1 caption 1"]
    assert ds["image_id"] == [0, 1, 2]  # the row number where the source has no image_id
    assert ds[2]["image"].getpixel((0, 0)) == (20, 0, 0)
    rows = caption_rows(ds)  # training: one row per caption, the image's id kept
    assert rows["caption"] == [f"shape {i} caption {j}" for i in range(3) for j in range(2)]
    assert rows["image_id"] == [0, 0, 1, 1, 2, 2]
    assert rows[5]["image"].getpixel((0, 0)) == (20, 0, 0)


@pytest.mark.parametrize("value, expected", [
    ("  one caption ", ["one caption"]),
    (["first", "", "second"], ["first", "second"]),
    ([{"caption": "coco style", "id": 7}, {"caption": "another"}], ["coco style", "another"]),
    ([{"raw": "from sentences", "tokens": ["from", "sentences"]}], ["from sentences"]),
])
def test_caption_column_forms(tmp_path, value, expected):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"image": "x.png", "caption": value, "image_id": 42}) + "\n")
    ds, _ = load_captions(str(path), "train")  # "caption" when the source has no "captions" column
    assert ds[0]["captions"] == expected and ds[0]["image_id"] == 42


def test_parquet_with_image_bytes_and_a_named_column(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    ds = datasets.Dataset.from_dict({"picture": [{"bytes": buf.getvalue(), "path": None}] * 2,
                                     "text": [["a", "b"], ["c"]]},
                                    features=datasets.Features({"picture": datasets.Image(),
                                                                "text": datasets.List(datasets.Value("string"))}))
    ds.to_parquet(tmp_path / "train.parquet")
    loaded, _ = load_captions(str(tmp_path / "train.parquet"), "train", image_column="picture", caption_column="text")
    assert loaded["captions"] == [["a", "b"], ["c"]] and loaded[0]["image"].getpixel((0, 0)) == (1, 2, 3)


def test_bad_caption_rows_are_counted_and_bad_columns_named(tmp_path):
    path = caption_file(tmp_path, 8)
    rows = path.read_text().splitlines()
    rows[1] = json.dumps({"image": "img1.png", "captions": ["", "  "]})
    rows[2] = json.dumps({"image": "missing.png", "captions": ["x"]})
    path.write_text("\n".join(rows) + "\n")
    ds, report = load_captions(str(path), "train", max_bad_fraction=0.5)
    assert len(ds) == 6 and report.skipped == {"empty_caption": 1, "missing_image": 1}
    with pytest.raises(DatasetError, match="more than the limit of 1.0%.*--max-bad-fraction"):
        load_captions(str(path), "train")
    with pytest.raises(DatasetError, match="no column 'text'.*--caption-column"):
        load_captions(str(path), "train", caption_column="text")
    numbers = tmp_path / "n.jsonl"
    numbers.write_text(json.dumps({"image": "img0.png", "caption": 3}) + "\n")
    with pytest.raises(DatasetError, match="column 'caption' holds.*expected captions.*--caption-column"):
        load_captions(str(numbers), "train")
    with pytest.raises(DatasetError, match="'easy-vqa' has no captions"):
        load_caption_dataset("easy-vqa", "test")
    with pytest.raises(DatasetError, match="fixed columns; drop --caption-column"):
        load_caption_dataset("scenes", "test", caption_column="text")


def test_a_row_without_an_image_id_never_takes_another_rows_id(tmp_path):
    """Row 1 has no id: its row number (1) would be row 0's id, and the feature cache would give
    row 1 row 0's picture. It gets a number past the largest id instead."""
    from mmfusion.training.features import distinct_images

    path = caption_file(tmp_path, 3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row, image_id in zip(rows, [1, None, 7]):
        row["image_id"] = image_id
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds, _ = load_captions(str(path), "train")
    assert ds["image_id"][:] == [1, 9, 7]  # 8 + row 1
    assert distinct_images(ds) == 3


# ---- training and evaluation on a caption file ---------------------------------------------


@pytest.mark.slow
def test_caption_training_and_alignment_on_a_file_hold_out_its_images(tmp_path, capsys):
    path = caption_file(tmp_path, 20, per_image=3)
    out = tmp_path / "run"
    metrics = train_vqa.run(*train_vqa.parse(["--vit", "vit-tiny", "--dataset", str(path), "--task", "caption",
                                              "--align-epochs", "1", "--max-steps", "2", "--output-dir", str(out),
                                              *QUIET]))
    printed = capsys.readouterr().out
    assert "evaluation: 2 of the 20 rows of" in printed and "held out of training by image" in printed
    assert "alignment: adapter only, 1.0 epochs on 54 captions" in printed  # 18 training images x 3
    assert (out / "align" / "model").is_dir()
    assert set(metrics["captions"]) == {"exact_match", "token_f1", "bleu4", "cider", "count"}
    assert metrics["captions"]["count"] == 2 and "accuracy" not in metrics
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert all(len(r["captions"]) == 3 for r in rows)  # scored against every reference of the image
    trained = {f"shape {i} caption 0" for i in range(20)} - {r["captions"][0] for r in rows}
    assert len(trained) == 18  # the held-out images' captions are not training rows


def test_eval_cli_scores_a_caption_file_and_picks_the_task_from_its_columns(tmp_path, capsys):
    model = train_vqa.build_vlm(train_vqa.VQAStageConfig(vit="vit-tiny"))
    model.save_pretrained(tmp_path / "vlm")
    path = caption_file(tmp_path, 3)
    assert cli_main(["eval", "--model", str(tmp_path / "vlm"), "--dataset", str(path), "--caption-max-new-tokens",
                     "3", "--output", str(tmp_path / "p.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "| captions | exact match | token F1 | BLEU-4 | CIDEr-D |" in printed and "VQA accuracy" not in printed
    rows = [json.loads(line) for line in (tmp_path / "p_captions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["captions"] == ["shape 0 caption 0", "shape 0 caption 1"]
    neither = tmp_path / "n.jsonl"
    neither.write_text(json.dumps({"image": "img0.png", "label": "x"}) + "\n")
    assert cli_main(["eval", "--model", str(tmp_path / "vlm"), "--dataset", str(neither)]) == 2
    err = capsys.readouterr().err
    assert "neither a question column ('question') nor a caption column" in err and "--caption-column" in err
    questions = tmp_path / "q.jsonl"  # questions, and a caption column named with a typo: not silently dropped
    questions.write_text(json.dumps({"image": "img0.png", "question": "what?", "answers": ["x"]}) + "\n")
    assert cli_main(["eval", "--model", str(tmp_path / "vlm"), "--dataset", str(questions), "--caption-column",
                     "captoins"]) == 2
    assert "has no column 'captoins' (--caption-column)" in capsys.readouterr().err


# ---- the metrics against the COCO caption evaluation's code --------------------------------


def _perturbed(rng: random.Random, words: list[str]) -> str:
    w = list(words)
    for _ in range(rng.randint(0, 3)):
        op = rng.random()
        if op < 0.3 and w:
            del w[rng.randrange(len(w))]
        elif op < 0.6:
            w.insert(rng.randint(0, len(w)), rng.choice(WORDS))
        elif w:
            w[rng.randrange(len(w))] = rng.choice(WORDS)
    return " ".join(w)


@pytest.mark.parametrize("seed", range(5))
def test_bleu4_and_cider_d_equal_pycocoevalcap(seed):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    rng = random.Random(seed)
    for _ in range(10):
        base = [rng.choices(WORDS, k=rng.randint(3, 14)) for _ in range(rng.randint(2, 30))]
        preds = [_perturbed(rng, b).title() + "." for b in base]  # case and punctuation are not words
        refs = [[_perturbed(rng, b) for _ in range(rng.randint(1, 5))] for b in base]
        gts = {i: [" ".join(caption_words(r)) for r in rs] for i, rs in enumerate(refs)}
        res = {i: [" ".join(caption_words(p))] for i, p in enumerate(preds)}
        theirs_bleu = Bleu(4).compute_score(gts, res, verbose=0)[0][3]
        theirs_cider = Cider().compute_score(gts, res)[0]
        assert bleu4(preds, refs) == pytest.approx(theirs_bleu, abs=1e-6)
        assert cider_d(preds, refs) == pytest.approx(theirs_cider, abs=1e-6)


def test_caption_metrics_with_several_references():
    refs = [["a red circle", "one red circle at the top"], ["two blue squares"]]
    m = caption_metrics(["A red circle.", "blue squares"], refs)
    assert m["exact_match"] == 0.5 and m["count"] == 2  # the first matches one of its references
    assert m["token_f1"] == pytest.approx((1.0 + 2 * 1.0 * (2 / 3) / (1 + 2 / 3)) / 2)  # best reference each
    perfect = caption_metrics(["the red circle at the top left", "two blue squares"],
                              ["the red circle at the top left", "two blue squares"])
    assert perfect["bleu4"] == pytest.approx(1.0) and perfect["exact_match"] == 1.0
    assert m["bleu4"] == 0.0  # no 4-gram of "blue squares" or "a red circle" in common
    with pytest.raises(ValueError, match="at least one reference"):
        caption_metrics(["x"], [[]])
