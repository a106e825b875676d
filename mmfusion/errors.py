"""Every exception mmfusion raises for bad input, in one place, and how a command reports them.

Each one means "the input is wrong, here is how to fix it", not a bug: `run_command` (the
`mmfusion` command and the entry scripts) prints its message as one line and exits with code 2,
and `OneLineErrorParser` does the same for flags argparse cannot parse. All derive from
`MMFusionError`; each also derives from the built-in type callers would expect (`ValueError`,
`RuntimeError`).
"""

from __future__ import annotations

import argparse


class MMFusionError(Exception):
    """Base of every user-facing mmfusion error."""


class ConfigError(MMFusionError, ValueError):
    """A configuration value is impossible or inconsistent."""


class CheckpointError(MMFusionError, ValueError):
    """A saved model folder is missing, corrupt, or does not match the model asked for."""


class ConversionError(CheckpointError):
    """A transformers model cannot be imported exactly: unsupported architecture or option,
    or source keys / shapes that do not match the key table."""


class DatasetError(MMFusionError, ValueError):
    """A dataset cannot be loaded as asked: missing column, wrong type, empty split, too many bad rows."""


class ImageError(MMFusionError, ValueError):
    """An image cannot be read or converted to RGB."""


class PromptError(MMFusionError, ValueError):
    """A question or answer is empty or cannot fit the context."""


class TokenIdError(MMFusionError, ValueError):
    """A token id to decode is not an integer, or not in the tokenizer's vocabulary."""


class SlotCountError(MMFusionError, ValueError):
    """The number of `<|image|>` slots in a row differs from the image tokens the adapter yields."""


class TokenizerFilesError(MMFusionError, RuntimeError):
    """GPT-2's BPE files are missing or do not match the published hashes."""


class NonFiniteLossError(MMFusionError, RuntimeError):
    """The loss (or the weights) became NaN or infinite; the last good checkpoint is kept."""


class NonFiniteOutputError(MMFusionError, RuntimeError):
    """A model's outputs are NaN or infinite for an input: its weights overflow or the input holds
    such values; nothing it would generate means anything."""


class OneLineErrorParser(argparse.ArgumentParser):
    """A flag argparse cannot parse (unknown flag, bad type or choice) ends like any other bad
    input: one line on stderr, exit code 2; argparse's default also prints the whole usage."""

    def __init__(self, *args, **kwargs) -> None:
        # No abbreviations: `captions -- --output-d X` slipped past the job's guard on its own
        # flags (an exact-name check), and a typo can silently pick another flag.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        """Refuse a flag given an empty value (`--model ""`, `--output $UNSET`): each one would
        otherwise mean the current folder or a default, and fail later under another name."""
        import sys

        argv = list(sys.argv[1:] if args is None else args)
        for i, token in enumerate(argv):
            if token == "--":  # what follows belongs to another command, which checks it
                break
            flag, eq, value = token.partition("=")
            action = self._option_string_actions.get(flag) if token.startswith("-") else None
            if action is None or action.nargs == 0:
                continue
            given = value if eq else argv[i + 1] if i + 1 < len(argv) else None
            if given == "":  # only '': a name of spaces is a legal file name, and a question checks its own
                self.error(f"argument {flag}: empty value (''; an unset shell variable?); "
                           "pass a value or leave the flag out")
        return super().parse_known_args(args, namespace)


def json_kind(value) -> str:
    """A JSON value's type in JSON's words, for messages: 'a string', 'null', 'a list'..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    kinds = ((str, "a string"), ((int, float), "a number"), (list, "a list"), (dict, "an object"))
    return next((word for kind, word in kinds if isinstance(value, kind)), type(value).__name__)


def fail(message: str) -> int:
    """Print `mmfusion: error: message` on stderr; the exit code for bad input (2)."""
    import sys

    print(f"mmfusion: error: {message}", file=sys.stderr)
    return 2


def run_command(command, argv: list[str] | None = None) -> int:
    """Run command(argv) as a program: bad input (an MMFusionError, a missing file or folder), a
    failing disk or Ctrl-C becomes one line on stderr and exit code 2; anything else is a bug and
    keeps its traceback. The `mmfusion` command and the entry scripts in training/ both end here."""
    try:
        command(argv)
    except (MMFusionError, FileNotFoundError, NotADirectoryError) as e:
        return fail(str(e))
    except OSError as e:  # the machine, not the code: a read-only or full disk, a permission
        where = f"{e.filename}: " if e.filename else ""
        return fail(f"{where}{e.strerror or e}; check the path, the free space and the permissions")
    except Exception as e:
        oom = "MemoryError" if isinstance(e, MemoryError) else out_of_memory(e)
        if oom:
            return fail(f"out of memory ({oom}); the model or batch does not fit this "
                        "machine: lower --batch-size (--grad-accum keeps the global batch), or use a smaller model "
                        "(--block-size, a smaller preset)")
        if type(e).__name__ == "SafetensorError" and "I/O error" in str(e):  # a failed write, not an OSError
            return fail(f"{str(e).split(': ', 1)[-1]}, writing a safetensors file; check the free space and the "
                        "permissions, or pass another --output-dir")
        raise  # a bug: its traceback
    except KeyboardInterrupt:
        return fail("interrupted")
    finally:
        end_process_group_at_exit()
    return 0


def out_of_memory(e: BaseException) -> str | None:
    """What an allocation failure asked for, in a few words, when `e` is one (torch's CPU
    allocator raises a RuntimeError "can't allocate memory: you tried to allocate N bytes", CUDA
    a torch.OutOfMemoryError, a RuntimeError too); None for any other error."""
    import re

    if not isinstance(e, RuntimeError):
        return None
    text = str(e)
    asked = re.search(r"tried to allocate (\d+) bytes", text)
    if asked:
        return f"{int(asked.group(1)) / 2**30:.1f} GiB asked for at once"
    if type(e).__name__ == "OutOfMemoryError" or "out of memory" in text.lower():
        return text.split("\n", 1)[0].split(". ", 1)[0][:120]
    return None


def end_process_group_at_exit() -> None:
    """Destroy a launched run's process group when the process exits (torch warns at exit about a
    group never destroyed), not when a command ends: the stages leave it up for the next stage or
    command in the same processes, and accelerate keeps using it (a second command after the group
    was destroyed failed: 'Default process group has not been initialized'; initializing it again
    hung). Registered once, after the command's imports, so it runs before their exit handlers."""
    import atexit

    atexit.unregister(_end_process_group)
    atexit.register(_end_process_group)


def _end_process_group() -> None:
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
