"""Lazy, per-tensor reading of Hugging Face checkpoint folders.

A model is never loaded whole: the engine reads one tensor at a time (safetensors `safe_open`
memory-maps the file), so computing task vectors needs memory for the cache plus one tensor.
Pickle checkpoints (`*.bin`) are refused unless the caller opts in with `allow_pickle=True`, and
then load with `torch.load(weights_only=True)` so no code in the file can run.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open

from ._errors import MergeError

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or a one-line `MergeError` naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MergeError(f"missing file {path}") from None
    except UnicodeDecodeError as exc:
        raise MergeError(f"{path} is not UTF-8 text (byte {exc.start}); re-save it as UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise MergeError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise MergeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise MergeError(f"{path} holds a JSON {type(data).__name__}, not an object; expected the usual mapping of keys")
    return data


def require_dir(path: str | Path, what: str) -> Path:
    """`path` as a Path if it is a folder, else a `MergeError` saying what was expected there."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise MergeError(f"{what} folder {p} does not exist; pass a Hugging Face model folder (config.json + *.safetensors)")
    return p


class CheckpointReader:
    """Names, shapes and lazily read tensors of one HF model folder (single or sharded)."""

    def __init__(self, folder: str | Path, *, allow_pickle: bool = False, label: str = "model") -> None:
        self.folder = require_dir(folder, label)
        self.label = label
        self._files: dict[str, Path] = {}  # tensor name -> file
        self._handles: dict[Path, Any] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._headers: dict[Path, tuple[int, dict[str, Any]]] = {}
        self._index(allow_pickle)

    def _index(self, allow_pickle: bool) -> None:
        f = self.folder
        if (f / SAFETENSORS_INDEX).is_file():
            self._from_index(f / SAFETENSORS_INDEX)
        elif (f / SAFETENSORS_SINGLE).is_file():
            self._from_files([f / SAFETENSORS_SINGLE])
        elif list(f.glob("*.safetensors")):
            self._from_files(sorted(f.glob("*.safetensors")))
        elif (f / PICKLE_INDEX).is_file() or (f / PICKLE_SINGLE).is_file():
            if not allow_pickle:
                raise MergeError(
                    f"{self.label} {f} holds only pickle checkpoints ({PICKLE_SINGLE}); pass allow_pickle=True "
                    "to load them with torch.load(weights_only=True), or convert them to safetensors"
                )
            if (f / PICKLE_INDEX).is_file():
                self._from_index(f / PICKLE_INDEX)
            else:
                self._from_files([f / PICKLE_SINGLE])
        else:
            raise MergeError(f"{self.label} {f} has no weights ({SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} expected)")

    def _from_index(self, index: Path) -> None:
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise MergeError(f"{index} has no 'weight_map'; re-save the model with save_pretrained")
        for name, shard in weight_map.items():
            path = self.folder / shard
            if not path.is_file():
                raise MergeError(f"{self.label} {self.folder}: shard {shard} listed in {index.name} is missing")
            self._files[name] = path
        for path in set(self._files.values()):
            self._open(path)

    def _from_files(self, paths: list[Path]) -> None:
        for path in paths:
            for name in self._open(path):
                self._files[name] = path

    def _open(self, path: Path) -> list[str]:
        """Tensor names of one file; a file the library cannot read is a `MergeError` naming it.

        safetensors checks the header (its length, JSON, and that every tensor's byte range lies
        inside the file) when the file is opened, so truncated or corrupt files fail here, once,
        not in the middle of a search."""
        if path.suffix == ".safetensors":
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise MergeError(
                    f"{self.label}: {path} is not a readable safetensors file ({_first_line(exc)}); "
                    "re-download or re-save it with save_pretrained"
                ) from None
            self._handles[path] = handle
            return list(handle.keys())
        # weights_only=True: tensors and plain containers only, no arbitrary code from the pickle.
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # a legacy (pre-zip) torch.save file cannot be memory-mapped; weights-only all the same
                # (its notice about the pickle protocol is noise: the load succeeds or is refused)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise MergeError(
                f"{self.label}: {path} holds objects other than tensors, which the weights-only loader refuses "
                "(they could run code); convert the checkpoint to safetensors where it was made"
            ) from None
        except (RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError) as exc:
            raise MergeError(
                f"{self.label}: {path} cannot be loaded as plain weights ({_first_line(exc)}); only tensors load "
                "(weights_only), never code: convert the checkpoint to safetensors"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise MergeError(f"{self.label}: {path} is not a state dict (names -> tensors); save model.state_dict() or safetensors")
        self._pickled[path] = state
        return list(state)

    def names(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape without reading the data."""
        path = self._files[name]
        if path in self._handles:
            return tuple(self._handles[path].get_slice(name).get_shape())
        return tuple(self._pickled[path][name].shape)

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype without reading the data."""
        path = self._files[name]
        if path in self._handles:
            return _ST_DTYPES[self._handles[path].get_slice(name).get_dtype()]
        return self._pickled[path][name].dtype

    def get(self, name: str, staging: "StagingBuffer | None" = None) -> torch.Tensor:
        """One tensor, read now (CPU, stored dtype).

        safetensors data is read with `os.pread` into a fresh tensor rather than through `safe_open`'s
        memory map: mapped file pages stay resident (and count in the process's RSS) while the file is
        open, which added a whole checkpoint per expert to the engine's peak memory while loading.
        With `staging`, the tensor is read into that reused buffer instead and is valid only until
        its next read: for values that are consumed at once (an expert's weights, turned into a task
        vector), so reading leaves no freed tensors between the long-lived ones (see `StagingBuffer`).
        """
        path = self._files[name]
        if path in self._handles:
            dtype_name, shape, begin, end = self._entry(path, name)
            dtype = _ST_DTYPES.get(dtype_name)
            if dtype is None or sys.byteorder != "little":
                return self._handles[path].get_tensor(name)
            out = torch.empty(shape, dtype=dtype) if staging is None else staging.view(shape, dtype)
            nbytes = end - begin
            if nbytes:
                view = memoryview(out.view(-1).view(torch.uint8).numpy())
                fd = os.open(path, os.O_RDONLY)
                try:
                    done = 0
                    while done < nbytes:
                        got = os.preadv(fd, [view[done:]], begin + done)
                        if got <= 0:
                            raise MergeError(f"{self.label}: {path} is truncated (tensor {name})")
                        done += got
                finally:
                    os.close(fd)
            return out
        return self._pickled[path][name]

    def _entry(self, path: Path, name: str) -> tuple[str, list[int], int, int]:
        """(dtype, shape, absolute begin, end) of one tensor from the file's safetensors header."""
        header = self._headers.get(path)
        if header is None:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            header = self._headers[path] = (8 + size, header)
        offset, entries = header
        entry = entries[name]
        begin, end = entry["data_offsets"]
        return entry["dtype"], list(entry["shape"]), offset + begin, offset + end

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, read one at a time."""
        for name in self._files:
            yield name, self.get(name)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars ("Loading weights", "Writing model shards") while inside: the
    bar is transformers' process-wide switch, restored on exit."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (library errors can run to pages)."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def load_config(folder: Path, label: str) -> dict[str, Any]:
    """config.json of a model folder as a dict."""
    path = folder / "config.json"
    if not path.is_file():
        raise MergeError(f"{label} {folder} has no config.json; pass a Hugging Face model folder")
    return read_json(path)


def config_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The dtype a config declares (`dtype` in transformers 5, `torch_dtype` before)."""
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return None


class StagingBuffer:
    """One growing byte buffer that successive reads reuse (`CheckpointReader.get(..., staging=)`).

    Why: reading an expert tensor by tensor into fresh tensors that die right after their task
    vector is computed leaves a freed hole next to every long-lived task vector. glibc cannot hand
    holes in the middle of its heap back to the OS, so on a 1.25B-parameter model with 3 experts they
    added ~2 GB to the loading peak. One buffer, grown to the largest tensor, allocates nothing per
    read.
    """

    def __init__(self) -> None:
        self._bytes = torch.empty(0, dtype=torch.uint8)

    def view(self, shape: list[int] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape` and `dtype` over the buffer's first bytes (grown when too small)."""
        numel = 1
        for size in shape:
            numel *= size
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if self._bytes.numel() < nbytes:
            self._bytes = torch.empty(0, dtype=torch.uint8)  # free the old one before allocating
            self._bytes = torch.empty(nbytes, dtype=torch.uint8)
        return self._bytes[:nbytes].view(dtype).view(shape)
