"""The `mmfusion` command.

    mmfusion main [--output-dir runs/main]        pretrain ViT, fine-tune VQA, evaluate (the main job)
    mmfusion captions [--output-dir runs/captions]  caption + VQA training on the scenes, evaluate (see --help)
    mmfusion pretrain-vit [flags]                 stage 1 (see --help)
    mmfusion train-vqa [flags]                    stage 2 (see --help)
    mmfusion eval --model DIR [--dataset easy-vqa|scenes|PATH] [--split test]   VQA accuracy (+ caption metrics)
    mmfusion generate --model DIR --image PATH [--question TEXT]
    mmfusion export --model DIR --output OUT     as transformers models (GPT2LMHeadModel, ViT/CLIP) + tokenizer
    mmfusion --version

Bad input ends with one line on stderr naming the problem, and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .errors import fail, run_command


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser whose own errors (unknown flag, bad type) are one line, exit code 2, like the stages'."""
    from .errors import OneLineErrorParser

    return OneLineErrorParser(prog=prog, description=description)


def _add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="where the model runs: cpu, cuda, cuda:N (default: %(default)s: the first CUDA device "
                             "torch sees, else the CPU)")


def _device(name: str):
    """--device as a torch.device, or a ConfigError naming the fix (checked before any work)."""
    import torch

    from .weights import checked_device

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return checked_device(name, "--device")


def _device_name(device) -> str:
    import torch

    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def cmd_generate(argv: list[str]) -> None:
    parser = _parser("mmfusion generate", "Caption an image or answer a question.")
    parser.add_argument("--model", required=True, help="a saved VLM folder (e.g. runs/main/vqa/model)")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--question", default=None, help="question; without it the model captions the image")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="length limit of the generated text (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 means greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample among the most likely tokens reaching probability p (default: all)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: unseeded)")
    parser.add_argument("--decoder", default="eager", choices=["eager", "static", "compiled"],
                        help="decoding loop: eager, static (fixed shapes over the whole KV cache) or compiled "
                             "(static through torch.compile; a CUDA graph on a GPU) (default: %(default)s)")
    _add_device_flag(parser)
    args = parser.parse_args(argv)
    from .errors import ConfigError
    from .generation import GenerationConfig
    from .vlm import VLM

    try:
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, decoder=args.decoder)
    except ConfigError as e:  # its messages start with the field name; the user typed a flag
        field, _, rest = str(e).partition(" ")
        if field not in vars(args):
            raise
        raise ConfigError(f"--{field.replace('_', '-')} {rest}") from e
    if config.temperature == 0:  # greedy: a sampling flag would be silently ignored
        for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed)):
            if value is not None:
                raise ConfigError(f"{flag} needs --temperature > 0 (sampling); greedy decoding ignores it")
    model = VLM.from_pretrained(args.model, map_location=_device(args.device)).eval()
    if args.question is None:
        print(model.caption(args.image, **config.__dict__))
    else:
        print(model.answer(args.image, args.question, **config.__dict__))


def _at_least_one(args: argparse.Namespace, *names: str) -> None:
    """Integer flags that must be >= 1 (None: not given), refused before any model is loaded."""
    from .config import check_number

    for name in names:
        if getattr(args, name) is not None:
            check_number(f"--{name.replace('_', '-')}", getattr(args, name), 1, integer=True)


def _real(path: str | Path) -> Path:
    """`path` absolute, with `~` and symbolic links resolved; a link loop is kept as it is, where
    Path.resolve raises (the command that reads or writes it then says what is wrong)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _training_cwds(record: dict, run_folder: Path) -> list[Path]:
    """Where a relative dataset path in the run's `record` may be relative to, the likeliest first:
    the recorded working directory; else the one the run's relative output_dir implies (from
    there it names `run_folder`), then the current one."""
    cwd = record.get("cwd")
    if isinstance(cwd, str) and Path(cwd).is_absolute():
        return [Path(cwd)]
    bases = [Path.cwd()]
    run = record.get("run")
    output_dir = run.get("output_dir") if isinstance(run, dict) else None
    if isinstance(output_dir, str) and output_dir and not Path(output_dir).expanduser().is_absolute():
        parts = Path(output_dir).parts  # "." has none: the run folder was the working directory
        if ".." not in parts and (not parts or run_folder.parts[-len(parts):] == parts):
            bases.insert(0, Path(*run_folder.parts[:len(run_folder.parts) - len(parts)]))
    return bases


def _training_rows_warning(model: str, dataset: str, split: str) -> str | None:
    """A warning when the model's own run_config.json says it trained on these rows."""
    from .data import BUILT_IN
    from .data.splits import same_rows, same_source
    from .errors import CheckpointError
    from .weights import read_json

    run_folder = _real(model).parent  # resolved: the parent of `--model .` is "."
    record = run_folder / "run_config.json"
    if not record.exists():
        return None  # no record of the training data: nothing to compare
    try:
        data = read_json(record)
        source, train_split = data["stage"]["dataset"], data["stage"]["train_split"]
    except (CheckpointError, KeyError, TypeError):
        return None  # an unreadable record says nothing either
    if not (isinstance(source, str) and source and isinstance(train_split, str)):
        return None  # nor does a hand-edited one (a number, null or a list where a path belongs)
    candidates = [] if source in BUILT_IN else [base / Path(source).expanduser()
                                                for base in _training_cwds(data, run_folder)]
    # the recorded path from the first folder that holds it; none does: a Hub id, or data since moved
    found = next((p for p in candidates if p.exists()), None)
    same = same_source(str(found), dataset) if found is not None else source == dataset
    if same and same_rows(dataset, train_split, None, split):
        return (f"WARNING: {model} was trained on {source} [{train_split}]; these rows include its training rows, "
                "so the accuracy says how well it fits them (its own held-out score is in its metrics.json)")
    return None


def _check_not_an_input(output: Path, model: str, dataset: str) -> None:
    """Refuse an eval output that would overwrite what eval reads: the dataset, or a file of the model."""
    from .data import BUILT_IN
    from .errors import ConfigError

    target = _real(output)
    model_dir = _real(model)
    if target.is_relative_to(model_dir):
        raise ConfigError(f"--output {output} is inside the --model folder {model}, whose files it would "
                          "overwrite; pass a path outside it (by default the predictions go next to the model)")
    data = Path(dataset).expanduser()
    if dataset in BUILT_IN or not data.exists():
        return  # a built-in or Hub dataset: no local file to overwrite
    data = _real(data)
    if target == data or (data.is_dir() and target.is_relative_to(data)):
        raise ConfigError(f"--output {output} is {'the' if target == data else 'inside the'} --dataset {dataset} "
                          "being evaluated, which the predictions would overwrite or change; pass another path")


def cmd_eval(argv: list[str]) -> None:
    parser = _parser("mmfusion eval", (
        "Evaluate a saved VLM: VQA accuracy per answer type, and on a dataset with captions (scenes, or your "
        "data with a caption column) caption exact match, token F1, BLEU-4 and CIDEr-D."))
    parser.add_argument("--model", required=True, help="a saved VLM folder")
    parser.add_argument("--dataset", default="easy-vqa",
                        help="easy-vqa, scenes, a parquet/JSONL file or folder, or a hub id (default: %(default)s)")
    parser.add_argument("--task", default="auto", choices=["auto", "vqa", "caption", "both"],
                        help="what to evaluate (default: auto: questions where the data has a question column, "
                             "captions where it has a caption column, both where it has both)")
    parser.add_argument("--split", default="test", help="the split to evaluate (default: %(default)s)")
    parser.add_argument("--image-column", default="image", help="column holding the images in your data (default: %(default)s)")
    parser.add_argument("--question-column", default="question",
                        help="column holding the questions in your data (default: %(default)s)")
    parser.add_argument("--answer-column", default=None,
                        help="column holding the answers in your data (default: 'answers', else 'answer')")
    parser.add_argument("--caption-column", default=None,
                        help="column holding a caption or a list of captions per image in your data "
                             "(default: 'captions', else 'caption')")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N questions and caption only the first N images (default: all)")
    parser.add_argument("--batch-size", type=int, default=256, help="prompts generated at once (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit (default: %(default)s)")
    parser.add_argument("--caption-max-new-tokens", type=int, default=48, help="caption length limit (default: %(default)s)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,  # the training stages' default
                        help="stop if more rows of your data than this are unusable (default: %(default)s)")
    parser.add_argument("--output", default=None,
                        help="predictions file, JSON lines ending in .jsonl (default: next to the model); captions "
                             "go to *_captions.jsonl. A symbolic link is written through, as a shell's > does")
    _add_device_flag(parser)
    args = parser.parse_args(argv)
    from .config import check_number
    from .data import BUILT_IN, SCENES, load_caption_dataset, load_vqa_dataset
    from .evaluation import (
        format_caption_table,
        format_template_table,
        format_vqa_table,
        predict,
        predict_captions,
        score,
        score_by_template,
        score_captions,
        write_jsonl,
    )
    from .vlm import VLM
    from .weights import check_writable

    _at_least_one(args, "limit", "batch_size", "max_new_tokens", "caption_max_new_tokens")
    check_number("--max-bad-fraction", args.max_bad_fraction, 0, 1)
    device = _device(args.device)
    # resolved: with `--model .` the folder next to the model is the parent of the current one
    out = Path(args.output) if args.output else _real(args.model).parent / f"predictions_{args.split}.jsonl"
    cap_out = _captions_output(out, args.output)
    for path in (out, cap_out):  # before any work, not after it
        check_writable(path, "--output", folder=False)
        _check_not_an_input(path, args.model, args.dataset)
    trained_on = _training_rows_warning(args.model, args.dataset, args.split)
    if trained_on:
        print(trained_on)
    task = args.task if args.task != "auto" else _auto_task(args)
    _check_eval_flags(parser, args, task)
    model = VLM.from_pretrained(args.model, map_location=device).eval()
    print(f"device: {_device_name(device)}")
    if task in ("caption", "both"):
        columns = {} if args.dataset in BUILT_IN else {"image_column": args.image_column,
                                                       "caption_column": args.caption_column,
                                                       "max_bad_fraction": args.max_bad_fraction}
        captions, report = load_caption_dataset(args.dataset, args.split, **columns)
        print(f"data: {report}")
    if task in ("vqa", "both"):
        columns = {} if args.dataset in BUILT_IN else {"image_column": args.image_column,
                                                       "question_column": args.question_column,
                                                       "answer_column": args.answer_column,
                                                       "max_bad_fraction": args.max_bad_fraction}
        dataset, report = load_vqa_dataset(args.dataset, args.split, **columns)
        print(f"data: {report}")
        start = time.perf_counter()
        rows = predict(model, dataset, args.limit, args.batch_size, args.max_new_tokens)
        write_jsonl(out, rows)
        print(format_vqa_table(score(rows)))
        if args.dataset == SCENES:
            print(format_template_table(score_by_template(rows)))
        print(f"{len(rows)} questions in {time.perf_counter() - start:.1f}s; predictions written to {out}")
    if task in ("caption", "both"):
        start = time.perf_counter()
        rows = predict_captions(model, captions, args.limit, args.batch_size, args.caption_max_new_tokens)
        write_jsonl(cap_out, rows)
        print(format_caption_table(score_captions(rows)))
        print(f"{len(rows)} images captioned in {time.perf_counter() - start:.1f}s; written to {cap_out}")


def _captions_output(out: Path, given: str | None) -> Path:
    """Where eval writes captions next to the predictions file `out`; a ConfigError unless `out`
    names a .jsonl file: a folder (`.`, `runs/`) has no file name, and any other suffix may be a
    file eval reads (`--output img.png` would replace a dataset's image)."""
    from .errors import ConfigError

    if out.name in ("", ".", "..") or (given or "").endswith(("/", os.sep)) or out.is_dir():
        raise ConfigError(f"--output {given} names a folder; pass a file path in it, such as "
                          f"{out / 'predictions.jsonl'}")
    if out.suffix.lower() != ".jsonl":
        raise ConfigError(f"--output {given}: predictions are written as JSON lines, to a path ending in .jsonl "
                          f"(such as {out.with_name(out.stem + '.jsonl')}); a path with another suffix may name "
                          "a file you keep, which the predictions would replace")
    return out.with_name(out.stem + "_captions.jsonl")


def _check_eval_flags(parser, args, task: str) -> None:
    """A column flag this evaluation would ignore is a ConfigError, not a silent no-op (a typo in
    it would change nothing). The length limits may be given for either task, as scripts do."""
    from .data import BUILT_IN
    from .errors import ConfigError

    builtin = args.dataset in BUILT_IN
    own_data = builtin and "the built-in datasets name their own columns and have no bad rows"
    found = f" (--task auto found no {args.question_column!r} column)" if args.task == "auto" else ""
    no_questions = task == "caption" and f"only captions are evaluated{found}"
    no_captions = task == "vqa" and "only questions are evaluated"
    ignored = {"image_column": own_data, "max_bad_fraction": own_data,
               "question_column": own_data or no_questions, "answer_column": own_data or no_questions,
               "caption_column": own_data or no_captions}
    for name, why in ignored.items():
        if why and getattr(args, name) != parser.get_default(name):
            raise ConfigError(f"--{name.replace('_', '-')} would be ignored here ({why}); drop it")


def _auto_task(args) -> str:
    """eval's --task auto: what the data holds (scenes: both; easy-vqa: questions; your data: by its columns)."""
    from .data import EASY_VQA, SCENES, DatasetError
    from .data.captions import CAPTION_COLUMNS
    from .data.local import load_raw

    if args.dataset in (EASY_VQA, SCENES):
        return "both" if args.dataset == SCENES else "vqa"
    columns = load_raw(args.dataset, args.split, None)[0].column_names
    questions = args.question_column in columns
    captions = (args.caption_column in columns) if args.caption_column else any(c in columns for c in CAPTION_COLUMNS)
    if args.caption_column and not captions:  # named on purpose: a typo must not drop the captions silently
        raise DatasetError(f"{args.dataset} [{args.split}] has no column {args.caption_column!r} (--caption-column); "
                           f"its columns are {columns}")
    if not questions and not captions:
        raise DatasetError(f"{args.dataset} [{args.split}] has neither a question column ({args.question_column!r}) "
                           f"nor a caption column ({args.caption_column or ' or '.join(map(repr, CAPTION_COLUMNS))}); "
                           f"its columns are {columns}. Name them with --question-column / --caption-column")
    return "both" if questions and captions else "vqa" if questions else "caption"


# The jobs and stages are imported when their command runs: they pull in accelerate.
def cmd_main(argv: list[str]) -> None:
    from .training import main

    main.main(argv)


def cmd_captions(argv: list[str]) -> None:
    from .training import captions

    captions.main(argv)


def cmd_pretrain_vit(argv: list[str]) -> None:
    from .training import pretrain_vit

    pretrain_vit.main(argv)


def cmd_train_vqa(argv: list[str]) -> None:
    from .training import train_vqa

    train_vqa.main(argv)


def _holds_mmfusion_model(folder: Path) -> bool:
    """Whether `folder` holds a saved mmfusion model: its config.json keeps the model's settings
    under "config" (transformers' has no such key), or weights are there without a transformers config."""
    from .errors import CheckpointError
    from .weights import CONFIG_NAME, WEIGHTS_NAME, read_json

    try:
        data = read_json(folder / CONFIG_NAME) if (folder / CONFIG_NAME).exists() else None
    except CheckpointError:
        data = None  # unreadable: whose it is cannot be told, so the weights decide
    if isinstance(data, dict) and "model_type" in data:
        return "config" in data
    return (folder / WEIGHTS_NAME).exists()


def _check_export_output(model: str, output: str) -> None:
    """Refuse an export folder holding a saved mmfusion model: transformers' save_pretrained writes
    the same file names (config.json, model.safetensors) over it."""
    from .errors import ConfigError

    out = Path(output).expanduser()
    if _real(out) == _real(model):
        raise ConfigError(f"--output {output} is the --model folder; exporting there would overwrite the model "
                          "with transformers files: choose another folder")
    if out.is_dir() and _holds_mmfusion_model(out):
        raise ConfigError(f"--output {output} holds a saved mmfusion model, which the export would overwrite: "
                          "choose another folder (a new one, or an earlier export)")


def cmd_export(argv: list[str]) -> None:
    parser = _parser("mmfusion export", (
        "Write a saved model as transformers models: a GPT as GPT2LMHeadModel with GPT-2's tokenizer, a ViT as "
        "ViTModel / ViTForImageClassification / CLIPVisionModel with its image processor config, a VLM as both "
        "(OUT/gpt2, OUT/vit) plus its adapter and a model card, and also whole as LlavaForConditionalGeneration with "
        "a processor (OUT/llava) where LLaVA can represent it (the model card names what stops it otherwise)."))
    parser.add_argument("--model", required=True, help="a saved mmfusion VLM, GPT or ViT folder")
    parser.add_argument("--output", required=True, help="the folder to write")
    args = parser.parse_args(argv)
    from .errors import CheckpointError
    from .export import export
    from .gpt import GPT
    from .vit import ViT
    from .vlm import VLM
    from .weights import read_config

    _check_export_output(args.model, args.output)
    kinds = {cls.model_type: cls for cls in (VLM, GPT, ViT)}
    kind = read_config(args.model)["model_type"]
    if kind not in kinds:
        raise CheckpointError(f"{args.model} holds a {kind!r} model; export takes {sorted(kinds)}")
    notes = export(kinds[kind].from_pretrained(args.model), args.output, source=args.model)
    for note in notes:
        print(f"note: {note}")
    print(f"exported {kind} to {args.output}")


COMMANDS = {
    "main": cmd_main,
    "captions": cmd_captions,
    "pretrain-vit": cmd_pretrain_vit,
    "train-vqa": cmd_train_vqa,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "export": cmd_export,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        from . import __version__

        print(f"mmfusion {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if not argv or argv[0] in ("-h", "--help") else fail(f"unknown command {argv[0]!r}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("datasets").propagate = False  # it prints through a handler of its own: once is enough
    return run_command(COMMANDS[argv[0]], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
