"""Where a DARE-TIES merge spends its time: the fused kernel with and without the field hash, and
the phases of one engine apply, each against the compiled plain pass, measured side by side.

`merge_speed` gives the end-to-end ratio (issue 13, item 6: DARE-TIES <= 4x a plain pass). This says
what that ratio is made of, so a target can be judged against what the arithmetic allows:

* **Kernels** (`--entries`): one flat bf16 tensor, 3 experts, the same fused TIES kernel
  (`methods._fused._make_kernel`, normalize on) with three sparsifications, timed in interleaved
  rounds with the plain pass (`merge_speed._plain_kernel`: base + sum of weighted task vectors, one
  compiled read-once-write-once loop): `dense` (no sparsification), `thr` (magnitude thresholds:
  TIES), `dare` (DARE windows: the int32 field hash of `_draws.field_hash` per expert and entry).
  `dare - thr` is what the three field hashes cost.
* **Phases** (`--sizes`): a synthetic Llama of `merge_speed` with 3 experts, warmed up, then per
  candidate the CPU time of planning (`_sources`: recipe -> per-tensor plans), packing the small
  tensors' plans (`PackedGta.of`), the packed kernel, and the per-tensor fused kernels, next to the
  whole `apply` and the plain pass.

    python -m evomerge.experiments.benchmarks.dare_cost --threads 1
    python -m evomerge.experiments.benchmarks.dare_cost --entries 1M,50M --sizes none      # kernels only

Times are process CPU time (the benchmark machine is shared; with one thread that is this
process's work); medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Callable

import torch

from evomerge.experiments.benchmarks.merge_speed import (SIZES, PlainPass, _plain_kernel, in_child, per_layer_recipe,
                                                        sample, synthetic_llama)

EXPERTS = 3
KINDS = ("dense", "thr", "dare")


def _rounds(runs: dict[str, Callable[[], object]], repeats: int, calls: int) -> dict[str, float]:
    """Median CPU seconds per call of each run over `repeats` interleaved rounds; "<key> wall": the
    median wall seconds (what counts with several threads: CPU time adds up every thread's)."""
    times: dict[str, list[tuple[float, float]]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            times[key].append(sample(fn, calls))
    result = {key: statistics.median(c for _, c in v) for key, v in times.items()}
    result.update({f"{key} wall": statistics.median(w for w, _ in v) for key, v in times.items()})
    return result


def kernels(entries: int, repeats: int, threads: int | None) -> dict[str, float]:
    """Plain pass vs the fused TIES kernel with each sparsification kind, on one flat tensor."""
    from evomerge.merge.methods._draws import window_bounds
    from evomerge.merge.methods._fused import _call, _make_kernel

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(entries, generator=g) * 0.02).bfloat16()
    deltas = [(torch.randn(entries, generator=g) * 0.002).bfloat16() for _ in range(EXPERTS)]
    out = torch.empty_like(base)
    shift, bound = zip(*(window_bounds(offset, 2048) for offset in (5, 1000, 4000)))
    ints = torch.tensor([bound, [12345, -999, 77], [5, 6, 7], shift], dtype=torch.int32)
    floats = torch.tensor([[0.001] * EXPERTS, [float("inf")] * EXPERTS, [0.3, 0.4, 0.5], [0.3, 0.4, 0.5]])
    lo, hi, coef, weight = floats.unbind(0)
    bound_t, k0, k1, shift_t = ints.unbind(0)
    start, lam = torch.zeros((), dtype=torch.int32), torch.tensor(1.0)

    def kernel(kind: str) -> Callable[[], object]:
        kinds = (kind,) * EXPERTS
        build = lambda: _make_kernel(kinds, True, True, False)  # noqa: E731
        return lambda: _call(("dare_cost", kinds), build, out, base, deltas, lo, hi, coef, weight, bound_t, k0, k1,
                             shift_t, start, lam)

    plain = torch.compile(_plain_kernel, dynamic=False)
    w = torch.full((EXPERTS,), 0.5)
    runs: dict[str, Callable[[], object]] = {"plain": lambda: plain([out], [base], [[d] for d in deltas], w)}
    runs.update({kind: kernel(kind) for kind in KINDS})
    for fn in runs.values():  # compile, first touch
        fn()
    calls = max(1, round(2e7 / entries))
    result = _rounds(runs, repeats, calls)
    plain_s, plain_wall = result["plain"], result["plain wall"]
    print(f"kernels, {entries / 1e6:.2f}M bf16 entries, {EXPERTS} experts, {torch.get_num_threads()} thread(s), "
          f"medians of {repeats} interleaved rounds of {calls} call(s):")
    for key in runs:
        seconds, wall = result[key], result[f"{key} wall"]
        print(f"  {key:6s} CPU {seconds * 1e3:9.3f} ms  {seconds / entries * 1e9:6.3f} ns/entry  {seconds / plain_s:5.2f}x plain"
              f" | wall {wall * 1e3:9.3f} ms  {wall / plain_wall:5.2f}x plain")
    hashes = result["dare"] - result["thr"]
    print(f"  the {EXPERTS} field hashes (dare - thr, CPU): {hashes / entries * 1e9:.3f} ns/entry = {hashes / plain_s:.2f}x plain "
          f"({hashes / EXPERTS / entries * 1e9:.3f} ns per expert and entry)", flush=True)
    return {key: seconds / (plain_wall if key.endswith("wall") else plain_s) for key, seconds in result.items()}


def phases(base: Path, experts: dict[str, Path], label: str, repeats: int, threads: int | None) -> dict[str, float]:
    """CPU time of each phase of a DARE-TIES apply (mergekit L1 rescale) on a loaded engine."""
    from evomerge.merge import MergeEngine
    from evomerge.merge.methods._fused import FusedGta, PackedGta

    if threads:
        torch.set_num_threads(threads)
    engine = MergeEngine.load(base, experts, progress=False)
    target = {n: torch.empty_like(engine.base_tensor(n)) for n in engine.layout.slots}
    recipe = per_layer_recipe("dare_ties", engine.expert_names, engine.layout.num_layers)
    engine.warm_up([recipe], target)
    plain = PlainPass(engine, target)
    plain()
    arena = engine._packed_arena()
    index = {e: i for i, e in enumerate(engine.expert_names)}
    state: dict[str, object] = {}

    def plan() -> None:
        state["items"] = list(engine._sources(recipe))

    def pack() -> None:
        plans = {item.name: (source, [index[e] for e in item.experts]) for item, source in state["items"]}  # type: ignore[attr-defined]
        state["packed"] = PackedGta.of([plans.get(n) for n in arena.names], len(index), arena.row_starts) if arena else None

    def packed_kernel() -> None:
        if state["packed"] is not None:
            out, _ = arena.out(engine.dtype)
            state["packed"].apply(out, arena.base, arena.deltas, arena.segment, arena.row_first, 1 << 30, False)  # type: ignore[attr-defined]

    def tensor_kernels() -> None:
        done = set(arena.names) if arena is not None else set()
        for item, source in state["items"]:  # type: ignore[attr-defined]
            if item.name not in done:
                fused = FusedGta.of(source)
                fused.apply(target[item.name].view(-1), engine.base_tensor(item.name).view(-1), 1 << 30, False)

    runs: dict[str, Callable[[], object]] = {"plain pass": plain,
                                             "apply": lambda: engine.apply(recipe, target, stats=False),
                                             "planning": plan, "packing plans": pack, "packed kernel": packed_kernel,
                                             "per-tensor fused": tensor_kernels}
    plan()
    pack()
    slowest = max(sample(fn, 1)[1] for fn in runs.values())
    result = _rounds(runs, repeats, max(1, min(50, round(0.02 / max(slowest, 1e-6)))))
    plain_s = result["plain pass"]
    print(f"phases of a DARE-TIES apply, {label}: {engine.num_params / 1e6:.2f}M params, {len(engine.layout.slots)} "
          f"tensors ({len(arena.names) if arena else 0} packed), {torch.get_num_threads()} thread(s), CPU time:")
    for key in runs:
        print(f"  {key:17s} {result[key] * 1e3:9.3f} ms  {result[key] / plain_s:5.2f}x plain")
    rest = result["apply"] - sum(result[k] for k in runs if k not in ("plain pass", "apply"))
    print(f"  (apply - the phases above: {rest * 1e3:.3f} ms of copies out of the packed buffer, table gathers and "
          f"dispatch)", flush=True)
    return {key: result[key] / plain_s for key in runs}


def _count(text: str) -> int:
    value = text.strip().upper()
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(value[-1:], 1)
    return int(float(value.rstrip("KMG")) * scale)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", default="1M,50M", help="flat tensor sizes of the kernel comparison ('none': skip)")
    parser.add_argument("--sizes", default="1M,50M", help=f"synthetic models for the phases, out of {', '.join(SIZES)} ('none': skip)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds (medians are reported)")
    args = parser.parse_args(argv)
    entries = [] if args.entries == "none" else [_count(e) for e in args.entries.split(",") if e.strip()]
    sizes = [] if args.sizes == "none" else [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"--sizes: unknown size {unknown[0]!r}; choose from {', '.join(SIZES)} or none")
    for n in entries:
        in_child(kernels, n, args.repeats, args.threads)
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="dare_cost_") as tmp:
            base, experts = in_child(synthetic_llama, Path(tmp), EXPERTS, torch.bfloat16, 0, size)  # type: ignore[misc]
            in_child(phases, base, experts, f"synthetic Llama {size}", args.repeats, args.threads)


if __name__ == "__main__":
    main()
