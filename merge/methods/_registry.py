"""The method registry (`METHODS`, `get_method`) and the seeded mask generator."""

from __future__ import annotations

import hashlib

import torch

from ._base import MergeMethod
from ._breadcrumbs import Breadcrumbs, BreadcrumbsTies
from ._dare import DareLinear, DareTies
from ._della import Della, DellaLinear
from ._linear import Linear
from ._model_stock import ModelStock
from ._slerp import Nuslerp, Slerp
from ._ties import TaskArithmetic, Ties, TopK

METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        Linear(),
        TaskArithmetic(),
        Ties(),
        DareLinear(),
        DareTies(),
        Breadcrumbs(),
        BreadcrumbsTies(),
        Della(),
        DellaLinear(),
        Slerp(),
        Nuslerp(),
        ModelStock(),
        TopK(),
    )
}
"""Registry: method name -> stateless method instance."""


def get_method(name: str) -> MergeMethod:
    """The registered method `name`; ValueError naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; choose one of: {', '.join(sorted(METHODS))}") from None


def mask_seed(seed: int, trial: int, tensor_name: str) -> int:
    """63-bit seed from blake2b(seed, trial, tensor name): stable across processes and Python versions."""
    digest = hashlib.blake2b(f"{int(seed)}\x1f{int(trial)}\x1f{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def mergekit_seed(seed: int, trial: int, tensor_name: str) -> int:
    """The seed `draws="mergekit"` draws one tensor's masks with: `mask_seed`'s low 32 bits, so mergekit
    run with `random_seed` set to it draws the same masks for that tensor (its numpy seeding takes
    32 bits). mergekit seeds once per run, so only a run whose one drawing tensor is this one matches."""
    return mask_seed(seed, trial, tensor_name) & 0xFFFFFFFF


def mask_generator(seed: int, trial: int, tensor_name: str, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded from (run seed, trial, tensor name), so any trial's random masks
    (DARE, DELLA) can be rebuilt bit for bit. Python's `hash()` is salted per process, hence blake2b."""
    generator = torch.Generator(device=device)
    generator.manual_seed(mask_seed(seed, trial, tensor_name))
    return generator
