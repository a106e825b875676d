"""A saved model is a folder: `config.json` + `model.safetensors`.

Writes are atomic (temporary name, fsync, rename), so a crash mid-save leaves the previous
save loadable. Loading checks the model kind, the format version, every key, shape and dtype
kind, that every weight is finite, and that tied weights stored twice agree.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ConfigError, json_kind

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Metadata files are small; anything larger is not one of ours (and is not read into memory).
MAX_JSON_BYTES = 16 * 2**20


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# mkstemp makes its file private (0600); the saved file gets what open() would have given it.
FILE_MODE = _file_mode()


def atomic_write(path: str | Path, write) -> None:
    """Call `write(tmp_path)`, fsync the file, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)  # after: a writer may replace the file it was given
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a power loss only once its folder is synced
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (new names, renames) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under `folder` and the folders themselves, before a rename publishes it."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors stored once (the first name wins), contiguous, on CPU."""
    twins = tied_twins(model)
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()
            if name not in twins}


def tied_twins(model: torch.nn.Module) -> dict[str, str]:
    """Each state-dict name that shares its tensor with an earlier name (a tied weight) -> that name."""
    first: dict[tuple[int, int], str] = {}
    twins = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in first:
            twins[name] = first[key]
        else:
            first[key] = name
    return twins


def check_writable(path: str | Path, flag: str, folder: bool) -> None:
    """Refuse, before any work, an output `path` (a folder, or a file when `folder` is False) that
    exists as the other kind, or whose nearest existing parent cannot be written (read-only). A
    symbolic link is followed, as a write through it will be; a link loop is refused."""
    path = Path(path).expanduser()
    try:
        os.stat(path)
    except OSError as e:  # a missing path is fine: it will be made
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{flag} {path} is a symbolic link loop; remove the link or pass another path") from e
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and (not path.is_dir() if folder else not path.is_file()):
        kind = "folder" if folder else "regular file"
        raise ConfigError(f"{flag} {path} exists and is not a {kind}; name a {'folder' if folder else 'file'}")
    parent = path if folder else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:  # a real write: os.access says yes to root on a read-only mount, and to /proc
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {parent} cannot be written ({e.strerror or e}); "
                          "pass a path you can write to") from e


def stat_regular_file(path: Path, error: type[Exception], fix: str, should_be: str,
                      missing: str | None = None) -> os.stat_result:
    """`path`'s stat, or one `error`: it cannot be read (`missing` says what a missing file means,
    where given), or it is not a regular file -- a folder, or a FIFO that would block a read forever."""
    try:
        info = path.stat()
    except OSError as e:
        if missing is not None and isinstance(e, FileNotFoundError):
            raise error(missing) from e
        raise error(f"{path} cannot be read ({e.strerror or e}); {fix}") from e  # e.g. a symbolic link loop
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path} is not a regular file (a folder, FIFO or device); {should_be}")
    return info


def read_json(path: str | Path, error: type[Exception] = CheckpointError) -> Any:
    """The contents of a small JSON metadata file, or one `error` naming the file and the fix.

    Refused before reading: a path that is not a regular file (a folder, or a FIFO that would
    block), a file over MAX_JSON_BYTES. Then: bytes that are not UTF-8, invalid JSON, and
    nesting deep enough to exhaust Python's recursion limit."""
    path = Path(path)
    info = stat_regular_file(path, error, fix="check the path", should_be="it should be a JSON file")
    if info.st_size > MAX_JSON_BYTES:
        raise error(f"{path} is {info.st_size} bytes, too large for a metadata file (limit {MAX_JSON_BYTES}); "
                    "it is not a file mmfusion wrote")
    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); it is damaged or not a JSON file") from e
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON ({e}); restore it from a copy or save again") from e
    except RecursionError as e:
        raise error(f"{path} is nested too deeply to be a metadata file; it is damaged or not one of ours") from e
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror or e})") from e


def read_config(folder: str | Path) -> dict[str, Any]:
    if not isinstance(folder, (str, os.PathLike)):
        raise CheckpointError(f"a saved model is named by its folder's path (a str or Path), got "
                              f"{type(folder).__name__} {folder!r}")
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"{folder} does not exist; a saved model is a folder with {CONFIG_NAME} and "
                              f"{WEIGHTS_NAME} (save_pretrained writes one)")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; a saved model is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}")
    path = folder / CONFIG_NAME
    if not path.exists():
        raise CheckpointError(f"{path} is missing: {folder_kind(folder) or 'was this folder written by save_pretrained?'}")
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("model_type"), str) and "config" not in data:
        raise CheckpointError(f"{path} is a transformers config (model_type {data['model_type']!r}), not an mmfusion "
                              "one: import the model with --vit/--gpt (train-vqa), or mmfusion.convert")
    if not isinstance(data, dict) or "model_type" not in data or "config" not in data:
        raise CheckpointError(f"{path} is not an mmfusion config (no model_type/config keys)")
    if not isinstance(data["model_type"], str):  # a hand-edited list or number: `in` a dict would raise TypeError
        raise CheckpointError(f"{path}: \"model_type\" is {data['model_type']!r}, not a string; an mmfusion folder "
                              "names its model as \"vit\", \"gpt\" or \"vlm\"")
    if not isinstance(data["config"], dict):
        raise CheckpointError(f"{path}: \"config\" is {json_kind(data['config'])}, not an object of settings "
                              "(such as {\"n_layer\": 12, ...}); save the model again, or restore config.json "
                              "from a copy")
    version = data.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} was written by a newer mmfusion (format {version} > {FORMAT_VERSION}); upgrade mmfusion"
        )
    return data


EXPORT_MARKER = ".mmfusion-export.json"  # what an export lists it wrote (mmfusion.export_folder)


def folder_kind(folder: str | Path) -> str | None:
    """What a folder without a saved model's config.json is, with where its model is, for a
    message: a training run's folder, one of its checkpoints, an export. None: none of these."""
    folder = Path(folder)
    if (folder / "model" / CONFIG_NAME).is_file():
        return f"{folder} is a training run's folder; its model is {folder / 'model'}"
    if (folder / "progress.json").is_file():
        return (f"{folder} is a training checkpoint (continue its run with --resume {folder}); the run saves its "
                "model in its folder's model/ when it ends")
    if (folder / EXPORT_MARKER).is_file():
        return (f"{folder} is an export for transformers (mmfusion export): load it with transformers, or import "
                "it with --vit/--gpt")
    return None


def is_mmfusion_folder(folder: str | Path) -> bool:
    """Whether `folder` was written by save_pretrained (transformers folders also hold a
    config.json and a model.safetensors, so the file names alone do not tell)."""
    path = Path(folder) / CONFIG_NAME
    try:
        data = read_json(path)
    except CheckpointError:
        return False
    return isinstance(data, dict) and "model_type" in data and "config" in data and "format_version" in data


class PretrainedMixin:
    """save_pretrained / from_pretrained for models with `config`, `config_class`, `model_type`."""

    config_class: type
    model_type: str

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `model.safetensors` and `config.json` (model type, format version, config) into
        `folder`, created if needed; each file is replaced atomically. Returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = unique_state_dict(self)  # type: ignore[arg-type]
        atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        meta = {"model_type": self.model_type, "format_version": FORMAT_VERSION,
                "config": self.config.to_dict()}  # type: ignore[attr-defined]
        atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str | torch.device = "cpu"):
        """The model `save_pretrained` wrote to `folder`, its tensors on `map_location`. A
        CheckpointError if the folder holds another model type, an invalid config, or weights
        that do not match that config (see `load_state_strict`); a ConfigError if torch cannot
        place tensors on `map_location`."""
        config = cls.load_config(folder)
        check_config_fits_weights(config, Path(folder))  # before building: a lying size would allocate it
        try:  # construction too: a config that validates but cannot be built is still the file's fault
            model = cls(config)
        except (ValueError, TypeError, AttributeError) as e:
            raise cls._invalid_config(folder, e) from e
        model.load_weights(Path(folder) / WEIGHTS_NAME, map_location)
        return model

    @classmethod
    def load_config(cls, folder: str | Path):
        """The config of the model `save_pretrained` wrote to `folder`, without its weights; the
        CheckpointErrors of from_pretrained for the folder and its config.json."""
        data = read_config(folder)
        if data["model_type"] != cls.model_type:
            names = {"vit": "ViT", "gpt": "GPT", "vlm": "VLM"}
            held = names.get(data["model_type"], repr(data["model_type"]))
            raise CheckpointError(
                f"{folder} holds a {held} model, not a {names.get(cls.model_type, cls.model_type)}: pass a "
                f"{names.get(cls.model_type, cls.model_type)} folder, or load this one with {held}.from_pretrained"
            )
        try:
            return cls.config_class.from_dict(data["config"])
        except (ValueError, TypeError, AttributeError) as e:  # ConfigError is a ValueError
            raise cls._invalid_config(folder, e) from e

    @classmethod
    def _invalid_config(cls, folder: str | Path, e: Exception) -> CheckpointError:
        return CheckpointError(f"{Path(folder) / CONFIG_NAME} holds an invalid {cls.model_type} config ({e}); "
                               "was it edited by hand? save the model again")

    def load_weights(self, path: str | Path, map_location: str | torch.device = "cpu") -> None:
        """Load a safetensors file strictly (`load_state_strict`). Refused before opening: a path
        that is not a regular file (a FIFO would block forever), a device torch cannot use."""
        path = Path(path)
        device = checked_device(map_location)
        target = f" (a symbolic link to {os.readlink(path)}, which does not exist)" if path.is_symlink() else ""
        stat_regular_file(path, CheckpointError, fix="check the path, or restore the file from a copy",
                          should_be="it should be the safetensors file save_pretrained writes: save the model "
                                    "again, or restore it from a copy",
                          missing=f"{path} is missing{target}: the folder is incomplete; save the model again, or "
                                  "restore the file from a copy")
        try:
            tensors = load_file(path, device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated: "
                                  "save the model again, or restore the file from a copy") from e
        load_state_strict(self, tensors, source=str(path))  # type: ignore[arg-type]


def check_config_fits_weights(config, folder: Path) -> None:
    """Refuse, before building anything, a config.json describing a model far larger than the
    weights file holds (a lying block_size or n_layer would allocate gigabytes, or be killed for
    memory, before the shape check). `parameter_count` is a lower bound (biases and norms left
    out). Reads the safetensors header only; a file that cannot be read is left to load_weights."""
    bound = getattr(config, "parameter_count", None)  # a lower bound on the stored elements
    path = folder / WEIGHTS_NAME
    if bound is None or not path.is_file():
        return
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except Exception:  # safetensors raises several types for a damaged header
        return
    # Only where building would cost memory (over 2**26 weights, 256 MB, more than the file and
    # twice it); smaller mismatches build and get load_state_strict's message naming the tensor.
    if bound > max(2 * stored, stored + 2**26):
        raise CheckpointError(f"{folder / CONFIG_NAME} describes a model of at least {bound:,} weights, but {path.name} "
                              f"holds {stored:,} values: config.json and the weights come from different models (or "
                              "config.json was edited); save the model again, or restore config.json from a copy")


def checked_device(map_location: str | torch.device, name: str = "map_location") -> torch.device:
    """`map_location` as a torch.device, or a ConfigError naming the fix when torch cannot use it
    (`name`: what the user typed it as, e.g. the CLI's --device)."""
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"{name} {map_location!r} is not a device name ({e}); use 'cpu' or 'cuda'") from e
    if device.type == "meta":
        raise ConfigError(f"{name} 'meta' holds shapes, not weights; load on 'cpu' or 'cuda'")
    if device.type == "cpu":
        device = torch.device("cpu")  # one CPU device: safetensors refuses 'cpu:0'
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{name} {str(device)!r} but torch sees no CUDA device; use 'cpu'")
    try:  # an index past the last device, or a backend this torch was built without
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ImportError, NotImplementedError) as e:  # torch.cuda asserts without CUDA;
        why = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0]  # hpu: no torch.hpu; mps: a listing
        raise ConfigError(f"{name} {str(device)!r}: torch cannot place tensors there ({why}); "
                          "use 'cpu' or a device torch lists") from e
    return device


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "integer"


def load_state_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into `model`, allowing tied duplicates to be absent; raise CheckpointError on
    any mismatch: missing or unexpected keys, shapes, a dtype of another kind (an integer or bool
    tensor for a float weight; float16/bfloat16 for float32 is fine), a NaN or inf, or a tied pair
    stored twice with different values."""
    own = model.state_dict()
    twins = tied_twins(model)
    missing = sorted(set(own) - set(twins) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}; "
                              "the weights belong to another kind of model or another version")
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in tensors.items() if v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{source}: shapes do not match the config (key, stored, expected): {bad[:8]}; "
                              "config.json and the weights come from different models")
    for k in (k for k in own if k in tensors):  # the model's order, so "first" is stable
        stored, expected = tensors[k].dtype, own[k].dtype
        if _kind(stored) != _kind(expected):  # copy_ would cast silently: int32 bits of a float read as numbers
            raise CheckpointError(f"{source}: {k} is stored as {str(stored).removeprefix('torch.')}, expected a "
                                  f"{_kind(expected)} dtype ({str(expected).removeprefix('torch.')}); the file is "
                                  "damaged or was not written by save_pretrained: save the model again")
        if stored.is_floating_point and not bool(tensors[k].isfinite().all()):
            raise CheckpointError(f"{source}: {k} holds NaN or inf values; the model diverged before it was saved, "
                                  "or the file is damaged: load an earlier checkpoint, or restore the file from a copy")
    for k, twin in twins.items():  # both stored: one copy_ would silently overwrite the other
        if k in tensors and not torch.equal(tensors[k].to(tensors[twin].dtype), tensors[twin]):
            raise CheckpointError(f"{source}: {k} differs from {twin}, but this model ties them (one tensor, "
                                  f"saved as {twin}); the weights come from an untied model: keep only {twin}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)
