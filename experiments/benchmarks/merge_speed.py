"""Merge speed: in-place TIES / DARE-TIES at mixed per-layer densities vs a plain elementwise pass.

The ratio that matters for a search is merge time / (the time to touch the same bytes once): a plain
pass that sums the experts' cached task vectors into the target (`target = base + sum(deltas)`),
measured in the same run on the same tensors, so machine speed cancels out. Peak RSS is reported
relative to the model size, against the engine's budget of (experts + 2) x model.

    python -m evomerge.experiments.benchmarks.merge_speed --repeats 2      # synthetic ~0.5B Llama, bf16
    python -m evomerge.experiments.benchmarks.merge_speed --zoo small      # a cached toy zoo as well
    python -m evomerge.experiments.benchmarks.merge_speed --chunks 65536,262144,1048576   # tune the chunk
    python -m evomerge.experiments.benchmarks.merge_speed --compile off  # eager chunked path, for comparison
    python -m evomerge.experiments.benchmarks.merge_speed --layers 100 --repeats 3   # a 1.25B model (~13 GB RAM)

Each measurement runs in a fresh child process that loads the checkpoints from disk as a user would
(the synthetic checkpoints are written by another child first), so its peak RSS (ru_maxrss) is the
engine's: loading, table building and merging, nothing of the construction. The RSS of the bare
interpreter with torch + transformers imported is reported too, and the peak after each phase
(loaded, target written, tables built, kernels compiled, merging), so growth can be told from the
process's fixed cost: a larger model (`--layers`) shrinks the fixed part, not the part that scales.

Acceptance (issue "Merge engine"): TIES and DARE-TIES <= 3x the plain pass on the 0.5B model;
peak RSS <= (experts + 2) x model size.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from evomerge.merge import ExpertParams, GroupRule, MergeEngine, MergeRecipe, fixed_mmap_threshold
from evomerge.merge.methods._draws import field_key


def synthetic_llama(folder: Path, num_experts: int, dtype: torch.dtype, seed: int = 0,
                    num_layers: int = 34) -> tuple[Path, dict[str, Path]]:
    """A random Llama (hidden 1024, vocab 32000; 34 layers = 0.47B parameters, each further layer
    11.8M) + experts = base + small noise.

    Written tensor by tensor from a name -> shape table, never as a live model, so building it
    needs one model in memory.
    """
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=num_layers,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=64, tie_word_embeddings=False)
    config.dtype = str(dtype).removeprefix("torch.")
    kv = config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (32000, 1024), "model.norm.weight": (1024,), "lm_head.weight": (32000, 1024)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (1024, 1024), p + "self_attn.k_proj.weight": (kv, 1024),
            p + "self_attn.v_proj.weight": (kv, 1024), p + "self_attn.o_proj.weight": (1024, 1024),
            p + "mlp.gate_proj.weight": (2816, 1024), p + "mlp.up_proj.weight": (2816, 1024),
            p + "mlp.down_proj.weight": (1024, 2816), p + "input_layernorm.weight": (1024,),
            p + "post_attention_layernorm.weight": (1024,),
        })
    gen = torch.Generator().manual_seed(seed)
    base = {n: (torch.randn(s, generator=gen) * 0.02).to(dtype) for n, s in shapes.items()}
    paths = {}
    for k in range(num_experts + 1):
        name = "base" if k == 0 else f"expert{k}"
        out = folder / name
        out.mkdir(parents=True)
        config.save_pretrained(out)
        state = base if k == 0 else {n: (t.float() + torch.randn(t.shape, generator=gen) * 0.002).to(dtype) for n, t in base.items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        paths[name] = out
        del state
    del base
    return paths.pop("base"), paths


RECIPE_SEED = 1


def per_layer_recipe(method: str, experts: list[str], num_layers: int, trial: int = 0) -> MergeRecipe:
    """A global rule plus one rule per layer, densities varying by layer and expert."""
    rules = [GroupRule(method=method, experts={e: ExpertParams(weight=0.5, density=0.5) for e in experts})]
    for layer in range(num_layers):
        rules.append(GroupRule(layers=[layer], method=method, experts={
            e: ExpertParams(weight=0.3 + 0.1 * j, density=0.2 + 0.6 * ((layer * 7 + j * 3) % 10) / 10) for j, e in enumerate(experts)}))
    return MergeRecipe(rules=rules, normalize=True, seed=RECIPE_SEED, trial=trial)


def plain_pass(engine: MergeEngine, target: Mapping[str, torch.Tensor]) -> None:
    """target = base + sum of all experts' task vectors: one elementwise pass over the same bytes."""
    for name in engine.layout.slots:
        dst = target[name]
        dst.copy_(engine.base_tensor(name))
        for expert in engine.expert_names:
            dst.add_(engine._delta(expert, name))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(label: str, base: Path, experts: Mapping[str, Path], repeats: int, chunk_sizes: list[int] | None = None,
            threads: int | None = None, compile: str = "auto") -> dict[str, float]:
    """Load, build tables, time plain pass / TIES / DARE-TIES; runs inside a fresh process (see `_child`)."""
    if threads:
        torch.set_num_threads(threads)
    fixed_mmap_threshold()  # as the CLI does before it loads
    idle = _rss()
    start = time.perf_counter()
    mode = {"auto": "auto", "on": True, "off": False}[compile]
    engine = MergeEngine.load(base, experts, progress=False, compile=mode)
    load_s = time.perf_counter() - start
    phases = {"loaded": _rss()}
    target = {n: torch.empty_like(engine.base_tensor(n)) for n in engine.layout.slots}
    model_bytes = sum(t.numel() * t.element_size() for t in target.values())
    names = list(engine.expert_names)
    result: dict[str, float] = {"params": engine.num_params, "model_gb": model_bytes / 1e9, "experts": len(names),
                                "threads": torch.get_num_threads(), "load_s": load_s, "fused": engine.fused}
    # The first pass page-faults every target page: from here on the target is resident, as a scorer's
    # live model is before a search's first apply builds its tables (peak RSS counts it).
    plain_pass(engine, target)
    phases["target"] = _rss()
    start = time.perf_counter()
    for expert in names:  # what the first TIES apply would do: one table per (expert, tensor)
        for name in engine.layout.slots:
            engine._table(expert, name, engine._delta(expert, name))
    result["tables_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for expert in names:  # what the first DARE apply with mergekit's L1 rescale adds: one WindowL1 per large tensor
        for name in engine.layout.slots:
            table = engine._table(expert, name, engine._delta(expert, name))
            table.window_l1(engine._delta(expert, name), field_key(RECIPE_SEED, table.identity))
    result["window_tables_s"] = time.perf_counter() - start
    phases["tables"] = _rss()
    # Warm-up: the first apply of each method compiles its fused kernels (and hands the tables'
    # temporaries back to the OS); not per-candidate cost, so it is timed apart.
    result["chunk"] = engine.chunk_elements
    plains: list[float] = []
    for chunk in chunk_sizes or [engine.chunk_elements]:
        engine.chunk_elements = chunk
        suffix = "" if chunk_sizes is None or len(chunk_sizes) == 1 else f"@{chunk}"
        recipes = {m: per_layer_recipe(m, names, engine.layout.num_layers) for m in ("ties", "dare_ties")}
        for method, recipe in recipes.items():
            result[f"{method}{suffix}_first_s"] = timed(lambda: engine.apply(recipe, target, stats=False))
            timed(lambda: engine.apply(recipe, target, stats=True))  # compiles the stats variant
        phases.setdefault("compiled", _rss())
        # Interleaved rounds, medians: the machine is shared, so every ratio compares times taken
        # side by side rather than a plain pass measured minutes before the merges.
        times: dict[str, list[float]] = {"plain": []}
        for _ in range(repeats):
            times["plain"].append(timed(lambda: plain_pass(engine, target)))
            for method, recipe in recipes.items():
                times.setdefault(method, []).append(timed(lambda: engine.apply(recipe, target, stats=False)))
                times.setdefault(f"{method}_stats", []).append(timed(lambda: engine.apply(recipe, target, stats=True)))
        plain = statistics.median(times["plain"])
        plains += times["plain"]
        for method in recipes:
            result[f"{method}{suffix}_s"] = statistics.median(times[method])
            result[f"{method}{suffix}_ratio"] = result[f"{method}{suffix}_s"] / plain
            result[f"{method}{suffix}_stats_ratio"] = statistics.median(times[f"{method}_stats"]) / plain
    plain = result["plain_s"] = statistics.median(plains)
    plain_after = result["plain_after_s"] = max(plains)
    peak = phases["merging"] = _rss()
    for phase, rss in phases.items():
        result[f"peak_rss_{phase}_over_model"] = rss / model_bytes
    result["peak_rss_gb"] = peak / 1e9
    result["peak_rss_over_model"] = peak / model_bytes
    result["idle_rss_gb"] = idle / 1e9
    result["engine_rss_over_model"] = (peak - idle) / model_bytes
    result["budget_over_model"] = len(names) + 2
    print(f"{label}: {engine.num_params / 1e6:.2f}M params, {model_bytes / 1e9:.4f} GB ({engine.dtype}), {len(names)} experts, "
          f"{torch.get_num_threads()} threads, chunk {engine.chunk_elements if chunk_sizes is None else chunk_sizes}, "
          f"fused kernels {'on' if engine.fused else 'off'}")
    print(f"  load {load_s:.2f}s | magnitude tables {result['tables_s']:.2f}s | DARE window-L1 tables "
          f"{result['window_tables_s']:.2f}s | plain pass median {plain:.3f}s (slowest {plain_after:.3f}s)")
    for chunk in chunk_sizes or [None]:
        suffix = "" if chunk is None or len(chunk_sizes or []) == 1 else f"@{chunk}"
        head = f"  chunk {chunk}: " if suffix else "  "
        print(f"{head}TIES {result[f'ties{suffix}_s']:.3f}s = {result[f'ties{suffix}_ratio']:.2f}x "
              f"(with stats {result[f'ties{suffix}_stats_ratio']:.2f}x) | "
              f"DARE-TIES {result[f'dare_ties{suffix}_s']:.3f}s = {result[f'dare_ties{suffix}_ratio']:.2f}x "
              f"(with stats {result[f'dare_ties{suffix}_stats_ratio']:.2f}x)   [x plain pass]")
        print(f"{head}first apply (includes compiling): TIES {result[f'ties{suffix}_first_s']:.2f}s, "
              f"DARE-TIES {result[f'dare_ties{suffix}_first_s']:.2f}s")
    print(f"  peak RSS {peak / 1e9:.2f} GB = {result['peak_rss_over_model']:.2f}x model "
          f"(interpreter + torch alone {idle / 1e9:.2f} GB; engine {result['engine_rss_over_model']:.2f}x model; "
          f"budget {len(names) + 2}x)")
    print("  peak RSS after each phase (x model): " + ", ".join(f"{phase} {rss / model_bytes:.2f}" for phase, rss in phases.items()))
    print(f"  (peak RSS = ru_maxrss of this process: loading, tables, compiling and merging, with the interpreter and "
          f"torch; the data alone, base + {len(names)} task vectors + target, is {len(names) + 2}.00x model)")
    return result


def _child(queue, fn, args) -> None:  # type: ignore[no-untyped-def]
    queue.put(fn(*args))


def in_child(fn: Callable[..., object], *args: object) -> object:
    """Run `fn(*args)` in a fresh spawned process (own ru_maxrss) and return its result."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"benchmark child failed with exit code {proc.exitcode}")
    return result


def _zoo(size: str) -> Path | None:
    """A complete cached zoo of this size, never built here (building costs minutes of shared CPU)."""
    from evomerge.experiments.zoo.build import _cache_key, default_zoo_dir, is_complete

    folder = default_zoo_dir(size, 0, "llama")
    return folder if is_complete(folder, _cache_key(size, 0, "llama", False)) else None


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (medians are reported)")
    parser.add_argument("--zoo", choices=["tiny", "small"], default="small",
                        help="also benchmark this toy zoo if it is cached (small falls back to tiny; never built here)")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic 0.5B model")
    parser.add_argument("--layers", type=int, default=34,
                        help="layers of the synthetic model (34 = 0.47B parameters; e.g. 100 = 1.25B, to see which "
                             "part of the peak RSS grows with the model and which is the process's fixed cost)")
    parser.add_argument("--chunks", help="comma-separated chunk lengths to compare (default: the engine's)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="fused compiled kernels (MergeEngine.load(compile=...)); auto = on for >= 50M params")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    chunk_sizes = [int(c) for c in args.chunks.split(",")] if args.chunks else None
    results: dict[str, dict[str, float]] = {}
    sizes = [args.zoo] + (["tiny"] if args.zoo == "small" else [])
    zoo = next(((size, folder) for size in sizes if (folder := _zoo(size)) is not None), None)
    if zoo is None:
        print(f"zoo: no cached {' or '.join(sizes)} zoo in ~/.cache/evomerge/zoo; skipped "
              f"(build it with `python -m evomerge.experiments.zoo build --size {args.zoo}`)")
    else:
        from evomerge.experiments.zoo import load_manifest

        size, folder = zoo
        manifest = load_manifest(folder)
        experts = {n: folder / p for n, p in manifest["experts"].items()}
        results[f"zoo-{size}"] = in_child(measure, f"zoo {size}", folder / "base", experts, args.repeats, chunk_sizes, args.threads, args.compile)  # type: ignore[assignment]
    if not args.no_synthetic:
        with tempfile.TemporaryDirectory(prefix="merge_speed_") as tmp:
            base, experts = in_child(synthetic_llama, Path(tmp), args.experts, getattr(torch, args.dtype), 0, args.layers)  # type: ignore[misc]
            key = "synthetic-0.5B" if args.layers == 34 else f"synthetic-{args.layers}-layers"
            results[key] = in_child(measure, "synthetic Llama", base, experts, args.repeats, chunk_sizes, args.threads, args.compile)  # type: ignore[assignment]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
