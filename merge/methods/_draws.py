"""Counter-based uniform draws for DARE / DELLA masks: a hash of (expert key, element index).

Why not `torch.rand(generator)`: on CPU it is a serial Mersenne Twister (~4 ns per entry, one
thread), which alone made DARE-TIES cost twice a plain pass over a 0.5B model, and a stream cannot
be re-read cheaply, while mergekit's L1 rescale needs every mask twice (kept L1 first, then the
merge). A counter-based draw `u_j = hash(key, j)` of the element index `j` is a pure function:

* any chunk of a tensor draws exactly the entries a whole-tensor call draws, so results do not depend
  on the chunk size (or on the device: int32 wrap-around arithmetic is the same on CPU and CUDA);
* a second pass recomputes the same mask instead of storing it;
* it runs as ~13 fused-size int32 kernels over a cache-resident chunk (~1 ns per entry on 2 threads).

The hash is Chris Wellons' `lowbias32` finaliser (two multiply-xorshift rounds, bias ~1e-4 of an ideal
32-bit permutation), applied to `j + key0` and keyed again with `key1` after the first multiply; keys
come from the caller's generator (`expert_keys`), so a trial is still rebuilt bit for bit from
(seed, trial, tensor name). Element indices wrap modulo 2**32 (tensors beyond 4G entries would
reuse draws; none exist). Keep probability for a constant p: `x < -2**31 + floor(p * 2**32)`, exact to
2**-32; for per-entry probabilities (DELLA): `u = x * 2**-32 + 0.5` in fp32, `u < p`.
"""

from __future__ import annotations

import threading

import torch

_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)  # as a signed int32
_LOCAL = threading.local()


def _s32(value: int) -> int:
    """`value` modulo 2**32 as a signed int32 Python int."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def expert_keys(generator: torch.Generator, count: int) -> list[tuple[int, int]]:
    """Two 32-bit keys per expert from `generator` (advances it by 2 * count draws; one sync on CUDA)."""
    keys = torch.randint(-(1 << 31), 1 << 31, (count, 2), generator=generator, dtype=torch.int64,
                         device=generator.device)
    return [(int(a), int(b)) for a, b in keys.tolist()]


def _iota(n: int, device: torch.device) -> torch.Tensor:
    cache = getattr(_LOCAL, "iota", None)
    if cache is None:
        cache = _LOCAL.iota = {}
    iota = cache.get(device)
    if iota is None or iota.numel() < n:
        iota = cache[device] = torch.arange(max(n, 1 << 16), dtype=torch.int32, device=device)
    return iota[:n]


def hash_bits(out: torch.Tensor, tmp: torch.Tensor, key: tuple[int, int], start: int) -> torch.Tensor:
    """`out` (int32, n entries) = hash(key, start + j) for j < n: uniform over all int32 values."""
    iota = _iota(out.numel(), out.device)
    torch.add(iota, _s32(start + key[0]), out=out)
    out.mul_(_M1)
    out.bitwise_xor_(key[1])
    torch.bitwise_right_shift(out, 16, out=tmp)
    tmp.bitwise_and_(0xFFFF)  # logical shift: the arithmetic one would copy the sign bit
    out.bitwise_xor_(tmp)
    out.mul_(_M2)
    torch.bitwise_right_shift(out, 15, out=tmp)
    tmp.bitwise_and_(0x1FFFF)
    out.bitwise_xor_(tmp)
    torch.bitwise_right_shift(out, 16, out=tmp)
    tmp.bitwise_and_(0xFFFF)
    return out.bitwise_xor_(tmp)


def keep_threshold(density: float) -> int:
    """int32 bound: P(hash < bound) = floor(density * 2**32) / 2**32, for 0 <= density < 1."""
    return -(1 << 31) + int(density * (1 << 32))


def bernoulli_mask(mask: torch.Tensor, bits: torch.Tensor, tmp: torch.Tensor, key: tuple[int, int], start: int,
                   density: float) -> torch.Tensor:
    """0/1 fp32 `mask` of Bernoulli(density) keeps for entries start..start+n-1 (`bits`, `tmp`: int32 scratch)."""
    hash_bits(bits, tmp, key, start)
    return torch.lt(bits, keep_threshold(density), out=mask)


def uniform_(out: torch.Tensor, bits: torch.Tensor, tmp: torch.Tensor, key: tuple[int, int], start: int) -> torch.Tensor:
    """fp32 uniforms in [0, 1] for entries start..start+n-1 (DELLA's per-entry probabilities)."""
    hash_bits(bits, tmp, key, start)
    out.copy_(bits)
    return out.mul_(2.0**-32).add_(0.5)
