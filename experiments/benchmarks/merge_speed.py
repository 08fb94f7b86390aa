"""Merge speed: in-place TIES / DARE-TIES at per-layer densities vs a compiled plain pass, three sizes.

The ratio that matters for a search is merge time / (the least time any in-place merge can take):
the plain pass `target = base + sum_i w_i * tv_i` over every tensor in ONE compiled call (one read of
the base and of each task vector, one write of the target; `PlainPass`), timed in interleaved rounds
with the merges on the same tensors, so machine speed cancels out. Times are printed as wall clock
and as process CPU time (steadier on a shared machine). Peak RSS is reported relative to the model
size, against the engine's budget of (experts + 2) x model.

    python -m evomerge.experiments.benchmarks.merge_speed                      # 1M, 50M, 500M Llamas, bf16
    python -m evomerge.experiments.benchmarks.merge_speed --threads 1 --repeats 7   # steadier when shared
    python -m evomerge.experiments.benchmarks.merge_speed --pruning approximate     # TIES by thresholds
    python -m evomerge.experiments.benchmarks.merge_speed --compile off  # eager chunked path, for comparison
    python -m evomerge.experiments.benchmarks.merge_speed --sizes 500M --layers 100 --repeats 3   # 1.25B (~13 GB RAM)
    python -m evomerge.experiments.benchmarks.merge_speed --zoo small      # a cached toy zoo as well

Each measurement runs in a fresh child process that loads the checkpoints from disk as a user would
(the synthetic checkpoints are written by another child first), so its peak RSS (ru_maxrss) is the
engine's: loading, warm-up (tables, compiles) and merging, nothing of the construction. The RSS of
the bare interpreter with torch + transformers imported is reported too, and the peak after each
phase (loaded, target written, warmed up, plain pass compiled, merging), so growth can be told from
the process's fixed cost: a larger model (`--layers`) shrinks the fixed part, not the part that scales.

Acceptance (issue 13, item 6): per-layer TIES <= 3x and DARE-TIES <= 4x the plain pass at 1M, 50M
and 500M parameters; peak RSS <= (experts + 2) x model size plus the process's fixed cost.
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
from evomerge.merge.methods import get_method


SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    # name: (vocab, hidden, intermediate, heads, kv heads, layers); head_dim = hidden / heads
    "1M": (2048, 128, 352, 4, 2, 3),          # 1.07M parameters: toy-zoo scale, 36 tensors
    "50M": (32000, 512, 1408, 8, 4, 6),       # 50.5M: the old compile threshold
    "500M": (32000, 1024, 2816, 16, 8, 37),   # 502M: a Qwen2.5-0.5B-sized Llama
}


def synthetic_llama(folder: Path, num_experts: int, dtype: torch.dtype, seed: int = 0, size: str = "500M",
                    num_layers: int | None = None) -> tuple[Path, dict[str, Path]]:
    """A random Llama of `size` (`SIZES`; `num_layers` overrides its depth) + experts = base + small noise.

    Written tensor by tensor from a name -> shape table, never as a live model, so building it
    needs one model in memory.
    """
    vocab, hidden, inter, heads, kv_heads, layers = SIZES[size]
    head_dim = hidden // heads
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=num_layers or layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=False)
    config.dtype = str(dtype).removeprefix("torch.")
    kv = kv_heads * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
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


def per_layer_recipe(method: str, experts: list[str], num_layers: int, trial: int = 0,
                     pruning: str = "exact") -> MergeRecipe:
    """A global rule plus one rule per layer, densities varying by layer and expert (for the methods
    that read a density; the others get weights only, as a recipe must)."""
    uses = get_method(method).uses
    extra = {"epsilon": 0.1} if "epsilon" in uses else {}  # densities 0.2-0.74: d +- 0.1 stays in (0, 1)

    def params(weight: float, density: float) -> ExpertParams:
        return ExpertParams(weight=weight, **({"density": density} if "density" in uses else {}), **extra)

    rules = [GroupRule(method=method, experts={e: params(0.5, 0.5) for e in experts})]
    for layer in range(num_layers):
        rules.append(GroupRule(layers=[layer], method=method, experts={
            e: params(0.3 + 0.1 * j, 0.2 + 0.6 * ((layer * 7 + j * 3) % 10) / 10) for j, e in enumerate(experts)}))
    return MergeRecipe(rules=rules, normalize=True, seed=RECIPE_SEED, trial=trial, pruning=pruning)


def _plain_kernel(outs: list[torch.Tensor], bases: list[torch.Tensor], deltas: list[list[torch.Tensor]],
                  weights: torch.Tensor) -> None:
    for i, (out, base) in enumerate(zip(outs, bases)):
        acc = base.float()
        for j, expert in enumerate(deltas):
            acc = acc + expert[i].float() * weights[j]
        out.copy_(acc)


class PlainPass:
    """The lower bound: `target = base + sum_i w_i * tv_i` for every tensor, in ONE compiled call.

    Any in-place merge reads the base and each expert's task vector at least once and writes the
    target once; this does exactly that and nothing else: one fused elementwise loop per tensor
    (inductor), all of them in a single compiled graph, so no per-tensor Python dispatch either.
    Built after the engine's warm-up: the first fused apply re-points small tensors into its packed
    arena, and this must read the same memory the merge reads.
    """

    def __init__(self, engine: MergeEngine, target: Mapping[str, torch.Tensor]) -> None:
        names = list(engine.layout.slots)
        self.outs = [target[n] for n in names]
        self.bases = [engine.base_tensor(n) for n in names]
        self.deltas = [[engine.task_vector(e, n) for n in names] for e in engine.expert_names]
        self.weights = torch.full((len(engine.expert_names),), 0.5)
        self._fn = torch.compile(_plain_kernel, dynamic=False)

    def __call__(self) -> None:
        self._fn(self.outs, self.bases, self.deltas, self.weights)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sample(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per call of `calls` back-to-back calls. CPU time does not count the
    time other processes held the cores (the benchmark machine is shared); with one torch thread it is
    the work this process did."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


METHODS = ("ties", "dare_ties")
"""The default `--methods`."""
LIMITS = {"ties": 3.0, "dare_ties": 4.0}
"""Acceptance (issue 13, item 6): per-layer TIES <= 3x and DARE-TIES <= 4x the plain pass, every size."""


def measure(label: str, base: Path, experts: Mapping[str, Path], repeats: int, threads: int | None = None,
            compile: str = "auto", pruning: str = "exact", methods: tuple[str, ...] = METHODS) -> dict[str, float]:
    """Load, warm up, time the plain pass and each method interleaved; runs in a fresh process (`in_child`)."""
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
    # Page-fault every target page first: from here on the target is resident, as a scorer's live
    # model is before a search's first apply builds its tables (peak RSS counts it).
    torch._foreach_copy_(list(target.values()), [engine.base_tensor(n) for n in target])
    phases["target"] = _rss()
    recipes = {m: per_layer_recipe(m, names, engine.layout.num_layers, pruning=pruning) for m in methods}
    # Warm-up (what a search does before its first timed candidate): tables, kernel compiles.
    result["warm_up_s"] = timed(lambda: engine.warm_up(recipes.values(), target))
    phases["warmed up"] = _rss()
    plain = PlainPass(engine, target)
    result["plain_compile_s"] = timed(plain)
    phases["plain compiled"] = _rss()
    # Interleaved rounds, medians: the machine is shared, so every ratio compares times taken side by
    # side rather than a plain pass measured minutes before the merges. Small models repeat each call
    # within a sample (>= ~20 ms of the slowest method), so one preemption does not decide a sample.
    runs: dict[str, Callable[[], object]] = {"plain": plain}
    for method, recipe in recipes.items():
        runs[method] = lambda recipe=recipe: engine.apply(recipe, target, stats=False)
        runs[f"{method}_stats"] = lambda recipe=recipe: engine.apply(recipe, target, stats=True)
    slowest = max(sample(fn, 1)[1] for fn in runs.values())
    calls = result["calls_per_sample"] = max(1, min(100, round(0.02 / max(slowest, 1e-6))))
    times: dict[str, list[tuple[float, float]]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            times[key].append(sample(fn, calls))
    for key, values in times.items():
        result[f"{key}_s"] = statistics.median(w for w, _ in values)
        result[f"{key}_cpu_s"] = statistics.median(c for _, c in values)
    for key in times:
        result[f"{key}_ratio"] = result[f"{key}_s"] / result["plain_s"]
        result[f"{key}_cpu_ratio"] = result[f"{key}_cpu_s"] / result["plain_cpu_s"]
    result["plain_max_s"] = max(w for w, _ in times["plain"])
    peak = phases["merging"] = _rss()
    for phase, rss in phases.items():
        result[f"peak_rss_{phase.replace(' ', '_')}_over_model"] = rss / model_bytes
    result["peak_rss_gb"] = peak / 1e9
    result["peak_rss_over_model"] = peak / model_bytes
    result["idle_rss_gb"] = idle / 1e9
    result["engine_rss_over_model"] = (peak - idle) / model_bytes
    result["budget_over_model"] = len(names) + 2
    plain_s = result["plain_s"]
    print(f"{label}: {engine.num_params / 1e6:.2f}M params, {len(engine.layout.slots)} tensors, "
          f"{model_bytes / 1e9:.4f} GB ({engine.dtype}), {len(names)} experts, {torch.get_num_threads()} threads, "
          f"fused kernels {'on' if engine.fused else 'off'}, TIES pruning {pruning}")
    print(f"  load {load_s:.2f}s | warm-up (tables + kernel compiles, once per process) {result['warm_up_s']:.2f}s | "
          f"plain pass compile {result['plain_compile_s']:.2f}s")
    print(f"  plain pass (one compiled read of base + {len(names)} task vectors, one write): median "
          f"{plain_s * 1e3:.3f} ms wall (slowest {result['plain_max_s'] * 1e3:.3f} ms), {result['plain_cpu_s'] * 1e3:.3f} ms "
          f"CPU; {repeats} interleaved rounds of {calls} call(s) each")
    for method in methods:
        limit = LIMITS.get(method)
        verdict = "no target" if limit is None else (
            f"limit {limit:.0f}x: " + ("ok" if max(result[f"{method}_ratio"], result[f"{method}_cpu_ratio"]) <= limit else "OVER"))
        print(f"  {method:9s} {result[f'{method}_s'] * 1e3:9.3f} ms = {result[f'{method}_ratio']:5.2f}x plain wall, "
              f"{result[f'{method}_cpu_ratio']:5.2f}x CPU ({verdict}) | with stats "
              f"{result[f'{method}_stats_s'] * 1e3:9.3f} ms = {result[f'{method}_stats_ratio']:5.2f}x wall, "
              f"{result[f'{method}_stats_cpu_ratio']:5.2f}x CPU")
    print(f"  peak RSS {peak / 1e9:.2f} GB = {result['peak_rss_over_model']:.2f}x model "
          f"(interpreter + torch alone {idle / 1e9:.2f} GB; engine {result['engine_rss_over_model']:.2f}x model; "
          f"budget {len(names) + 2}x)")
    print("  peak RSS after each phase (x model): " + ", ".join(f"{phase} {rss / model_bytes:.2f}" for phase, rss in phases.items()))
    print(f"  (peak RSS = ru_maxrss of this process: loading, tables, compiling and merging, with the interpreter and "
          f"torch; the data alone, base + {len(names)} task vectors + target, is {len(names) + 2}.00x model)", flush=True)
    return result


def _child(queue, fn, args) -> None:  # type: ignore[no-untyped-def]
    queue.put(fn(*args))


def in_child(fn: Callable[..., object], *args: object) -> object:
    """Run `fn(*args)` in a fresh spawned process (own ru_maxrss) and return its result."""
    import multiprocessing as mp
    import queue as queue_module

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args))
    proc.start()
    while True:  # a child that dies (an exception, the OOM killer) never puts a result: do not wait forever
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"benchmark child failed with exit code {proc.exitcode} (its traceback is above)") from None
    proc.join()
    return result


def _zoo(size: str) -> Path | None:
    """A complete cached zoo of this size, never built here (building costs minutes of shared CPU)."""
    from evomerge.experiments.zoo import is_complete
    from evomerge.experiments.zoo.build import _cache_key, default_zoo_dir

    folder = default_zoo_dir(size, 0, "llama")
    return folder if is_complete(folder, _cache_key(size, 0, "llama", False)) else None


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,50M,500M",
                        help=f"comma-separated synthetic model sizes out of {', '.join(SIZES)}")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (medians are reported)")
    parser.add_argument("--zoo", choices=["none", "tiny", "small"], default="none",
                        help="also benchmark this toy zoo if it is cached (never built here)")
    parser.add_argument("--real-shape", choices=["qwen2.5", "llama3.2", "mistral0.3", "gemma2"],
                        help="also benchmark this real-shaped fixture (its base, full experts and LoRA adapter; "
                             "built offline on first use, minutes)")
    parser.add_argument("--layers", type=int,
                        help="override the depth of every synthetic size (e.g. --sizes 500M --layers 100 = 1.25B "
                             "parameters, to see which part of the peak RSS grows with the model)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="fused compiled kernels (MergeEngine.load(compile=...)); off = the eager chunked path")
    parser.add_argument("--pruning", choices=["exact", "approximate"], default="exact",
                        help="MergeRecipe.pruning of the TIES recipe: mergekit's exact top-k (default) or thresholds")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated merge methods timed against the plain pass (e.g. ties,dare_ties,della)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    from evomerge.merge.methods import get_method

    for method in methods:
        try:
            get_method(method)
        except ValueError as exc:
            parser.error(f"--methods: {exc}")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"--sizes: unknown size {unknown[0]!r}; choose from {', '.join(SIZES)}")
    results: dict[str, dict[str, float]] = {}
    if args.zoo != "none":
        folder = _zoo(args.zoo)
        if folder is None:
            print(f"zoo: no cached {args.zoo} zoo in ~/.cache/evomerge/zoo; skipped "
                  f"(build it with `python -m evomerge.experiments.zoo build --size {args.zoo}`)")
        else:
            from evomerge.experiments.zoo import load_manifest

            experts = {n: folder / p for n, p in load_manifest(folder)["experts"].items()}
            results[f"zoo-{args.zoo}"] = in_child(measure, f"zoo {args.zoo}", folder / "base", experts, args.repeats,  # type: ignore[assignment]
                                                  args.threads, args.compile, args.pruning, methods)
    if args.real_shape:
        from evomerge.experiments.zoo import build_real_shape, load_manifest

        root = build_real_shape(args.real_shape)
        manifest = load_manifest(root)
        experts = {n: root / p for n, p in {**manifest["experts"], **manifest.get("lora_experts", {})}.items()}
        results[args.real_shape] = in_child(measure, f"{args.real_shape}-shaped fixture", root / manifest["base"],  # type: ignore[assignment]
                                            experts, args.repeats, args.threads, args.compile, args.pruning, methods)
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="merge_speed_") as tmp:
            base, experts = in_child(synthetic_llama, Path(tmp), args.experts, getattr(torch, args.dtype), 0, size,  # type: ignore[misc]
                                     args.layers)
            label = f"synthetic Llama {size}" + (f" ({args.layers} layers)" if args.layers else "")
            results[size] = in_child(measure, label, base, experts, args.repeats, args.threads, args.compile,  # type: ignore[assignment]
                                     args.pruning, methods)
    print("\nsummary (medians of interleaved rounds; x = method / plain pass, wall and CPU; limits TIES 3x, "
          "DARE-TIES 4x)")
    print(f"{'model':>6} {'params':>8} {'plain ms':>9} " + " ".join(f"{m[:9]:>9} {'x wall':>6} {'x CPU':>6}" for m in methods)
          + f" {'peak RSS x':>10}")
    for key, r in results.items():
        print(f"{key:>6} {r['params'] / 1e6:7.2f}M {r['plain_s'] * 1e3:9.3f} "
              + " ".join(f"{r[f'{m}_s'] * 1e3:9.3f} {r[f'{m}_ratio']:6.2f} {r[f'{m}_cpu_ratio']:6.2f}" for m in methods)
              + f" {r['peak_rss_over_model']:10.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
