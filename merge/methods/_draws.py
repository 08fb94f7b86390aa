"""Counter-based uniform draws for DARE / DELLA masks: a hash of (key, element index).

Why not `torch.rand(generator)`: on CPU it is a serial Mersenne Twister (~4 ns per entry, one
thread), which alone made DARE-TIES cost twice a plain pass over a 0.5B model, and a stream cannot
be re-read cheaply. A counter-based draw `u_j = hash(key, j)` of the element index `j` is a pure
function: any chunk of a tensor draws exactly the entries a whole-tensor call draws (results do not
depend on the chunk size, nor on the device: int32 wrap-around arithmetic is the same on CPU and
CUDA), and a second pass recomputes the same mask instead of storing it.

**DARE: window masks on a fixed field.** DARE keeps entry j with probability p. Here

    keep_j  <=>  (bucket(h_j) - offset) mod B < width,      B = 4096 buckets, width = round(p * B)

where `h_j = field_hash(field_key, j)` is a uniform int32 per entry, `bucket` its top 12 bits, the
*field key* is fixed per (run seed, expert, tensor) and the *offset* is drawn per trial from the
trial's generator. Every trial's mask is therefore an exact Bernoulli(width / B) draw per entry
(density quantized to 1/4096, the resolution of the magnitude tables' thresholds too), and another
trial's mask is another window of the same field (another seed draws another field). Why
windows: mergekit's L1 rescale needs the kept L1 `sum_j |d_j| keep_j` *before* the merge can combine experts, which used to cost a
whole extra pass over every task vector per candidate (2.9x a plain pass on the 0.5B benchmark).
With windows, the kept L1 of any (offset, width) is a difference of two prefix sums of a per-bucket
|d| histogram built once per (field, tensor) (`WindowL1`), so DARE with mergekit's rescale is one
pass, like TIES.

`field_hash` is three multiply-xorshift rounds on `j + key0`, keyed again with `key1` after the
first multiply. Two rounds (Chris Wellons' `lowbias32`, which this code used before) are not enough
for a counter input: the top bits of neighbouring entries were measurably dependent (chi-square
z of 5.5-9.5 for entries 3 apart over 1M entries, random keys); with three, neighbours at any lag, rows and differently keyed fields
pass the same tests (tests/merge/test_chunked.py). Keys are random (blake2b, or the generator):
keys differing in a few low bits would give related fields.

DELLA needs full-resolution draws (per-entry probabilities): it compares `hash_bits` (the field hash
with a final xorshift that mixes the top bits into the low ones; keys from the trial's generator)
with a per-rank int32 bound (`_della.keep_line`), so the eager path and the fused kernels draw the
same masks. Element indices
wrap modulo 2**32 (tensors beyond 4G entries would reuse draws; none exist).
"""

from __future__ import annotations

import functools
import hashlib
import threading

import torch

_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)  # as a signed int32
_M3 = 0xC2B2AE35 - (1 << 32)
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


BUCKET_BITS = 12
BUCKETS = 1 << BUCKET_BITS
"""DARE's field buckets: densities are quantized to 1/BUCKETS, windows start on bucket boundaries."""
_SHIFT = 32 - BUCKET_BITS


@functools.lru_cache(maxsize=1 << 16)
def field_key(seed: int, identity: str) -> tuple[int, int]:
    """The DARE field key of one (expert, tensor) `identity` under a run seed (blake2b: the same in
    every process, unlike Python's salted `hash`). Cached: every DARE apply asks it per tensor and
    expert, always with the run's seed."""
    digest = hashlib.blake2b(f"{int(seed)}\x1f{identity}".encode(), digest_size=8, person=b"evomerge.field").digest()
    return _s32(int.from_bytes(digest[:4], "little")), _s32(int.from_bytes(digest[4:], "little"))


def window_width(density: float) -> int:
    """Buckets a DARE window keeps for `density`: round(density * BUCKETS), clamped to [0, BUCKETS]."""
    return min(BUCKETS, max(0, round(density * BUCKETS)))


def window_offset(key: tuple[int, int]) -> int:
    """A trial's window start (in buckets) from its expert key (`expert_keys`)."""
    return key[0] & (BUCKETS - 1)


def window_bounds(offset: int, width: int) -> tuple[int, int]:
    """(shift, bound) with `keep <=> field_hash - shift < bound` in wrapping int32 (0 < width < BUCKETS).

    Subtracting `offset` whole buckets moves bucket b to b - offset (mod BUCKETS) and leaves the
    low bits alone, and `h < -2**31 + width * 2**20` reads `bucket(h) < width`."""
    return _s32(offset << _SHIFT), -(1 << 31) + (width << _SHIFT)


def field_hash(out: torch.Tensor, tmp: torch.Tensor, key: tuple[int, int], start: int) -> torch.Tensor:
    """`out` (int32, n entries) = hash(key, j) for j = start..start+n-1, uniform in its top bits
    (DARE's field reads its top 12 bits; `hash_bits` mixes them down for full-width uniforms)."""
    torch.add(_iota(out.numel(), out.device), _s32(start + key[0]), out=out)
    out.mul_(_M1)
    out.bitwise_xor_(key[1])
    torch.bitwise_right_shift(out, 16, out=tmp)
    tmp.bitwise_and_(0xFFFF)  # logical shift: the arithmetic one would copy the sign bit
    out.bitwise_xor_(tmp)
    out.mul_(_M2)
    torch.bitwise_right_shift(out, 15, out=tmp)
    tmp.bitwise_and_(0x1FFFF)
    out.bitwise_xor_(tmp)
    return out.mul_(_M3)


def hash_bits(out: torch.Tensor, tmp: torch.Tensor, key: tuple[int, int], start: int) -> torch.Tensor:
    """`field_hash` with a final xorshift, so every bit is mixed: uniform over all int32 values."""
    field_hash(out, tmp, key, start)
    torch.bitwise_right_shift(out, 16, out=tmp)
    tmp.bitwise_and_(0xFFFF)
    return out.bitwise_xor_(tmp)


def bucket_of(bits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Field bucket (0..BUCKETS-1, int32) of hashed `bits`: the top BUCKET_BITS bits of `bits + 2**31`."""
    return torch.bitwise_right_shift(bits, _SHIFT, out=out).bitwise_and_(BUCKETS - 1).bitwise_xor_(BUCKETS >> 1)


def window_mask(mask: torch.Tensor, bits: torch.Tensor, tmp: torch.Tensor, key: tuple[int, int], start: int,
                shift: int, bound: int) -> torch.Tensor:
    """0/1 fp32 `mask` of a DARE window (`window_bounds`) on the field `key`, entries start..start+n-1."""
    field_hash(bits, tmp, key, start)
    bits.sub_(shift)
    return torch.lt(bits, bound, out=mask)
