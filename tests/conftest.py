"""Fixtures shared by every test package. Only add here; other packages rely on these names."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_zoo() -> Path:
    """The tiny llama toy zoo (built once, cached under $EVOMERGE_CACHE/zoo); its directory."""
    from evomerge.experiments.zoo import build_zoo

    return build_zoo("tiny", seed=0, arch="llama", progress=False)
