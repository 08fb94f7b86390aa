"""Models named by Hugging Face id (``Qwen/Qwen2.5-7B``, ``org/name@revision``) -> local folders.

Users of mergekit and lm-eval name models by hub id, and most keep them in the local Hugging Face
cache. An id resolves through huggingface_hub's public `snapshot_download`: with
``local_files_only`` when the hub is offline (evomerge's CLI sets ``HF_HUB_OFFLINE=1`` unless the
user set it, so no run touches the network by surprise), with a download of the model files
otherwise. The result is the snapshot folder, whose path names the commit, so a run folder's
resolved spec pins the exact weights it merged.

This module knows nothing of the spec (the spec imports `is_model_id` to let ids through its path
check); `_resolve.resolve` calls `resolve_model_id` for every id in ``models``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<revision>[A-Za-z0-9_./-]+))?$")

MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt")
"""What a download fetches: configs, safetensors weights and tokenizer files. No pickled weights
(evomerge loads safetensors by default) and no code (``trust_remote_code`` is off by default)."""
PICKLE_FILES = ("*.bin", "*.pt")
"""Added to `MODEL_FILES` for ``models.allow_pickle``."""


class ModelIdError(ValueError):
    """An id that cannot be resolved; the message is one line and says how to fix it."""


@dataclass(frozen=True)
class ModelId:
    """A parsed ``org/name[@revision]``; ``revision`` None means the cache's ``main``."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def parse_model_id(text: str) -> ModelId | None:
    """The id in ``text``, or None when ``text`` is not shaped like one (a path: ``./x``, ``/x``, ``x``).

    A relative path ``a/b`` is shaped like an id too: callers try the path first.
    """
    if text.startswith((".", "~", "/")):
        return None
    match = _ID.match(text)
    return None if match is None else ModelId(match["repo"], match["revision"])


def is_model_id(text: str) -> bool:
    return parse_model_id(text) is not None


def resolve_model_id(
    model: ModelId, *, cache_dir: str | Path | None = None, offline: bool | None = None, allow_pickle: bool = False
) -> Path:
    """The local snapshot folder of ``model``.

    ``offline`` (default: huggingface_hub's ``HF_HUB_OFFLINE``) reads only the cache; otherwise
    the model's files are downloaded into it if missing. ``cache_dir`` defaults to the hub's
    (``HF_HUB_CACHE`` / ``HF_HOME``). Raises `ModelIdError` with the fix on one line.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = constants.HF_HUB_OFFLINE if offline is None else offline
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    patterns = [*MODEL_FILES, *(PICKLE_FILES if allow_pickle else ())]
    try:
        folder = snapshot_download(
            model.repo, revision=model.revision, cache_dir=cache, local_files_only=offline, allow_patterns=patterns
        )
    except LocalEntryNotFoundError:
        download = f"hf download {model.repo}" + (f" --revision {model.revision}" if model.revision else "")
        raise ModelIdError(
            f"{str(model)!r} is neither a local folder nor in the Hugging Face cache {cache}"
            + (" (offline: HF_HUB_OFFLINE=1)" if offline else "")
            + f"; fix: `{download}` on a machine with network access (same HF_HOME), "
            + ("set HF_HUB_OFFLINE=0 to let evomerge download it, " if offline else "")
            + "or give the model's local folder"
        ) from None
    except Exception as exc:  # noqa: BLE001 - hub errors (unknown repo, gated, no network) vary by version
        first = " ".join(str(exc).split())[:200]
        raise ModelIdError(f"{str(model)!r} could not be fetched from the Hugging Face hub ({type(exc).__name__}: {first}); "
                           "fix: check the id and revision, or give the model's local folder") from None
    return Path(folder)
