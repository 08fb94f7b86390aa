"""`MergeEngine`: cached task vectors in, merged weights written in place into a live model.

The search loop merges thousands of candidates; each must cost about one pass over the weights.
So everything that does not depend on the recipe is done once at load time (reading, checking,
task vectors, magnitude tables), and `apply` writes `base + merged delta` straight into the
target's parameters, one tensor at a time, in cache-sized flat chunks through one small fp32 buffer
(docs/merge-engine.md: every input is read from RAM about once).
Memory: base copy + one task vector per expert + the target = (experts + 2) x model size.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal, Mapping

import torch
from torch import nn

from ._compat import VocabPolicy, check_architecture, check_config_weights, check_tensors
from ._allocator import trim
from ._errors import MergeError
from ._io import (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, CheckpointReader, StagingBuffer, config_dtype, load_config,
                  quiet_transformers, require_dir)
from ._layout import ModelLayout
from ._lora import LoraAdapter, LoraModule, is_adapter
from ._packed import PACK_MAX_NUMEL, PackedArena
from ._plan import TensorPlan, plan_recipe
from ._recipe import ExpertParams, MergeRecipe
from .methods._base import ChunkPlan, chunk_buffer, chunk_elements, chunks, run_plan

if TYPE_CHECKING:
    from .methods import MagnitudeTable, MethodOptions
    from .methods._magnitude import SortKind

HEAD = "lm_head.weight"

CompileMode = Literal["auto"] | bool
FUSED_CHUNK_MIN = 1 << 30
"""Smallest chunk of the fused path, i.e. whole tensors: its kernel keeps no work buffers, so chunks
need not fit the cache, and every call costs ~50-100 us of guards and dispatch (with 1M-entry chunks
that was ~5% of a DARE-TIES merge of the 0.5B benchmark model)."""


@dataclass(frozen=True)
class MergeStats:
    """Cost figures of one merge, read by cost objectives (sparsity, distance to base).

    `kept_fraction` = changed_params / all parameters; `l1_distance` = sum |merged - base|.
    Both are None when `apply(..., stats=False)` skipped the extra pass that computes them.
    """

    kept_fraction: float | None
    l1_distance: float | None
    changed_params: int | None
    seconds: float


@dataclass(frozen=True)
class _SortJob:
    """One one-time sort to build (`MergeEngine.build_sorts`): `kept` bytes held for the run."""

    table: "MagnitudeTable"
    delta: torch.Tensor
    kind: "SortKind"
    kept: int

    @property
    def temporary(self) -> int:
        """Bytes held while it sorts: |d| in fp32, the sorted values, int64 indices, the int32
        result (20 per entry, measured); DELLA's row sorts go a block of rows at a time."""
        return 20 * (min(self.table.numel, 1 << 22) if self.kind == "rows" else self.table.numel)


def _tied(config: Any) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


class MergeEngine:
    """Base + experts loaded once; merges recipes in place. Create with `MergeEngine.load`."""

    def __init__(
        self, base_path: Path, config: Any, layout: ModelLayout, base: dict[str, torch.Tensor],
        full_deltas: dict[str, dict[str, torch.Tensor]], adapters: dict[str, LoraAdapter],
        expert_paths: dict[str, Path], device: torch.device, dtype: torch.dtype, cache_device: torch.device,
        compile: CompileMode = "auto",
    ) -> None:
        self.base_path = base_path
        self.config = config
        self.layout = layout
        self.device = device
        self.dtype = dtype
        self._cache_device = cache_device
        self._pin = device.type == "cuda" and cache_device.type == "cpu"
        self.expert_paths = expert_paths
        self.expert_names = list(expert_paths)
        self._base = base
        self._deltas = full_deltas
        self._adapters = adapters
        self._tables: dict[tuple[str, str], "MagnitudeTable"] = {}
        self._zeros: dict[tuple[int, ...], torch.Tensor] = {}
        self._scratch: dict[tuple[tuple[int, ...], int], torch.Tensor] = {}
        self._target: nn.Module | None = None
        self._arena: PackedArena | None = None
        self._arena_tried = False
        self._chunk: int | None = None
        self._trimmed_after: tuple[int, int] | None = None
        self.num_params = sum(t.numel() for t in base.values())
        if compile not in ("auto", True, False):
            raise MergeError(f"compile must be 'auto', True or False, got {compile!r}")
        self.compile: CompileMode = compile
        self.spill_dir: Path | None = None
        """Folder exact pruning's sort orders are memory-mapped from when memory is short
        (`build_sorts`); None refuses such a run instead. The CLI sets `$EVOMERGE_CACHE/sorts`."""
        """Fused compiled kernels for the task-arithmetic family (`methods/_fused.py`): "auto" (the
        default) and True fuse every model size, False keeps the eager chunked path. The environment
        variable EVOMERGE_COMPILE=0|1 overrides it. A failing compile falls back to the eager chunked
        path with one warning. Compiling costs seconds once per process and variant (`warm_up` pays
        it before a run's first timed candidate); eager per-layer TIES cost 15-43x a plain pass on the
        small zoo (issue 13), so "auto" no longer leaves small models eager (docs/merge-engine.md)."""

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls, base: str | Path, experts: Mapping[str, str | Path], *, device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None, allow_pickle: bool = False, vocab_policy: VocabPolicy = "error",
        progress: bool = True, compile: CompileMode = "auto",
    ) -> "MergeEngine":
        """Read and check base + experts, compute task vectors on `device` in the model dtype.

        `experts` maps a name (used in recipes) to an HF model folder or a PEFT LoRA adapter folder.
        `compile`: see `MergeEngine.compile` (fused kernels; "auto" = on for every model size).
        """
        from transformers import AutoConfig

        base_path = require_dir(base, "base model")
        if not experts:
            raise MergeError("no experts given; pass experts={'name': 'path/to/model-or-adapter', ...}")
        base_cfg = load_config(base_path, "base model")
        try:
            config = AutoConfig.from_pretrained(str(base_path))
        except (ValueError, OSError, KeyError):
            shipped = " (its auto_map names code shipped with the model, which evomerge never runs)" if base_cfg.get("auto_map") else ""
            raise MergeError(
                f"base model {base_path / 'config.json'}: transformers has no built-in model_type "
                f"{base_cfg.get('model_type')!r}{shipped}; use a model of an architecture transformers ships"
            ) from None
        reader = CheckpointReader(base_path, allow_pickle=allow_pickle, label="base model")
        check_config_weights(base_cfg, {n: reader.shape(n) for n in reader.names()}, f"base model {base_path}")
        names = [n for n in reader.names() if not (n == HEAD and _tied(config))]
        layout = ModelLayout.from_names(names, base_cfg)
        dtype = dtype or config_dtype(base_cfg) or reader.dtype(names[0])
        device = torch.device(device)
        shapes = {n: reader.shape(n) for n in names}
        cache_device = _cache_device(device, len(experts) + 1, sum(_numel(s) for s in shapes.values()), dtype)
        pin = device.type == "cuda" and cache_device.type == "cpu"
        bar = _progress(progress, len(names) * (1 + len(experts)), "loading")

        staging = StagingBuffer()
        base_t: dict[str, torch.Tensor] = {}
        for n in names:
            base_t[n] = _store(reader.get(n).to(dtype), cache_device, pin)
            bar.update(1)
        full: dict[str, dict[str, torch.Tensor]] = {}
        adapters: dict[str, LoraAdapter] = {}
        paths: dict[str, Path] = {}
        for ename, epath in experts.items():
            label = f"expert {ename!r} ({epath})"
            folder = require_dir(epath, f"expert {ename!r}")
            paths[ename] = folder
            if is_adapter(folder):
                adapters[ename] = _load_adapter(folder, label, shapes, device if cache_device.type != "cpu" else cache_device, dtype)
                bar.update(len(names))
                continue
            expert_cfg = load_config(folder, label)
            check_architecture(base_cfg, expert_cfg, label)
            ereader = CheckpointReader(folder, allow_pickle=allow_pickle, label=label)
            check_config_weights(expert_cfg, {n: ereader.shape(n) for n in ereader.names()}, label)
            enames = {n: ereader.shape(n) for n in ereader.names() if not (n == HEAD and _tied(config))}
            aligned = check_tensors(shapes, enames, label, vocab_policy)
            deltas: dict[str, torch.Tensor] = {}
            for n in names:
                value = ereader.get(n, staging)
                if n in aligned:
                    value = _align_rows(value, base_t[n])
                deltas[n] = _store(_subtract(value.to(cache_device), base_t[n], dtype), cache_device, pin)
                bar.update(1)
            full[ename] = deltas
        bar.close()
        trim()
        return cls(base_path, config, layout, base_t, full, adapters, paths, device, dtype, cache_device, compile)

    # ------------------------------------------------------------------ targets
    def new_target_model(self) -> nn.Module:
        """The one live HF model (base weights, eval mode, no grads) that `apply` rewrites."""
        if self._target is None:
            model = self._base_architecture()
            model.to(self.device).eval().requires_grad_(False)
            targets = self._targets(model)
            with torch.no_grad():
                for name in self.layout.slots:
                    targets[name].copy_(self._base[name])
            self._target = model
        return self._target

    def _base_architecture(self) -> nn.Module:
        """The base's HF model, its weights about to be overwritten by `new_target_model`.

        Loaded by transformers from the base's safetensors: the shards are memory-mapped, so this
        costs no random initialisation (`from_config` spent 8.2 s initialising a 0.7B Mistral-shaped
        model, against 0.07 s), and its non-persistent buffers (rotary frequencies) are the library's
        own. A base with only pickle files (`allow_pickle`) or unindexed shards is built from its config."""
        from transformers import AutoModelForCausalLM

        if (self.base_path / SAFETENSORS_INDEX).is_file() or (self.base_path / SAFETENSORS_SINGLE).is_file():
            with quiet_transformers():
                return AutoModelForCausalLM.from_pretrained(self.base_path, config=self.config, dtype=self.dtype,
                                                            use_safetensors=True)
        return AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)

    def _targets(self, target: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        tensors: Mapping[str, torch.Tensor]
        if isinstance(target, nn.Module):
            tensors = dict(target.named_parameters())
            tensors.update(dict(target.named_buffers()))
        else:
            tensors = target
        missing = [n for n in self.layout.slots if n not in tensors]
        if missing:
            raise MergeError(f"target lacks tensor {missing[0]} (and {len(missing) - 1} more); pass engine.new_target_model() or a state dict of the base architecture")
        for name in self.layout.slots:
            if tuple(tensors[name].shape) != tuple(self._base[name].shape):
                raise MergeError(f"shape mismatch: target tensor {name} has shape {tuple(tensors[name].shape)}, base has {tuple(self._base[name].shape)}")
        return tensors

    # ------------------------------------------------------------------ merging
    def check(self, recipe: MergeRecipe) -> list[TensorPlan]:
        """Validate a recipe against this engine; the per-tensor plan `apply` follows."""
        if recipe.lora_mode == "adapter":
            for rule in recipe.rules:
                saved = [e for e in rule.experts if e in self._adapters and self._adapters[e].full]
                if saved:
                    raise MergeError(f"expert {saved[0]!r} has modules_to_save tensors, which lora_mode='adapter' cannot merge; use lora_mode='materialized'")
        return plan_recipe(recipe, self.layout, self.expert_names, set(self._adapters))

    @torch.no_grad()
    def apply(self, recipe: MergeRecipe, target: nn.Module | Mapping[str, torch.Tensor], *, stats: bool = True) -> MergeStats:
        """Write the recipe's merged weights into `target` in place (no new model, no disk).

        Each tensor is merged in flat cache-sized chunks (`chunk_elements`): per chunk the method
        writes the merged task vector into a small fp32 buffer, the stats are accumulated from it, and
        `target = base + merged` is written in the same pass, so every input is read from RAM once.
        """
        start = time.perf_counter()
        tensors = self._targets(target)
        nonzero: list[torch.Tensor] = []
        l1_parts: list[torch.Tensor] = []
        chunk = self.chunk_elements
        out_buf = None
        fuse = self.fused
        items: Iterable[tuple[TensorPlan, Any]] = self._sources(recipe)  # lazy: adapter deltas share buffers
        packed_names: set[str] = set()
        if fuse and recipe.lora_mode != "adapter":
            items = list(items)
            packed = self._apply_packed(items, tensors, chunk, stats)
            if packed is not None:
                packed_names, result = packed
                if stats:
                    nonzero.append(result[0])
                    l1_parts.append(result[1])
            fuse = self.fused  # False once a compile failed
        for item, source in items:
            name = item.name
            if name in packed_names:
                continue
            dst, base = tensors[name], self._base[name]
            if source is None:
                dst.copy_(base)
                continue
            if isinstance(source, torch.Tensor):  # adapter mode: a whole fp32 delta
                if stats:
                    nonzero.append(torch.count_nonzero(source))
                    l1_parts.append(torch.linalg.vector_norm(source, ord=1))
                if dst.device == source.device:
                    torch.add(source, base.to(source.device), out=dst)
                else:
                    dst.copy_(source.add_(base.to(source.device)))
                continue
            base_flat = base.reshape(-1)
            if fuse and dst.is_contiguous() and dst.device == self.device == base.device:
                done = self._apply_fused(source, dst.view(-1), base_flat, chunk, stats)
                if done is not None:
                    if stats:
                        nonzero.append(done[0])
                        l1_parts.append(done[1])
                    continue
                fuse = self.fused  # False once a compile failed
            if out_buf is None:
                out_buf = chunk_buffer(self.device, chunk, "engine")
            direct = dst.is_contiguous() and dst.device == self.device
            dst_flat = dst.view(-1) if dst.is_contiguous() else None
            staged = None if dst_flat is not None else torch.empty(dst.shape, dtype=dst.dtype, device=self.device)
            sink = dst_flat if dst_flat is not None else staged.view(-1)
            for lo, hi in chunks(source.numel, chunk):
                piece = out_buf[: hi - lo]
                source.run(piece, lo, hi)
                if stats:
                    nonzero.append(torch.count_nonzero(piece))
                    l1_parts.append(torch.linalg.vector_norm(piece, ord=1, dtype=torch.float64))
                base_piece = base_flat[lo:hi]
                if base_piece.device != piece.device:
                    base_piece = base_piece.to(piece.device, non_blocking=True)
                if direct:
                    torch.add(piece, base_piece, out=sink[lo:hi])
                else:
                    sink[lo:hi].copy_(piece.add_(base_piece))
            if staged is not None:
                dst.copy_(staged)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._trim_after_building(recipe.seed)
        if not stats:
            return MergeStats(None, None, None, time.perf_counter() - start)
        n_changed = int(torch.stack(nonzero).sum().item()) if nonzero else 0
        l1 = float(torch.stack(l1_parts).to(torch.float64).sum().item()) if l1_parts else 0.0
        seconds = time.perf_counter() - start
        return MergeStats(n_changed / self.num_params, l1, n_changed, seconds)

    @torch.no_grad()
    def warm_up(self, recipes: Iterable[MergeRecipe], target: nn.Module | Mapping[str, torch.Tensor]) -> float:
        """Pay the one-time costs of a run before its first timed candidate; returns the seconds taken.

        Runs the sorts the recipes read, several at a time (`build_sorts`), then applies each recipe
        with and without stats (overwriting `target`, as any candidate would): that builds the
        magnitude tables the recipes read, packs the small tensors and compiles every fused kernel
        variant they use (a few seconds each, once per process). Later applies of recipes with the
        same methods and expert kinds then cost one pass over the weights.
        """
        start = time.perf_counter()
        recipes = list(recipes)
        self.build_sorts(recipes)
        for recipe in recipes:
            self.apply(recipe, target, stats=False)
            self.apply(recipe, target, stats=True)
        return time.perf_counter() - start

    @torch.no_grad()
    def build_sorts(self, recipes: Iterable[MergeRecipe], threads: int | None = None,
                    available: int | None = None, spill_dir: Path | None = None) -> float:
        """Run every one-time sort that merging `recipes` reads, `threads` at a time (default: torch's
        thread count), largest first; returns the seconds taken.

        Why: exact pruning keeps mergekit's sort order of each task vector it prunes, DELLA its row
        ranks (`MagnitudeTable.build_sort`). torch sorts a flat tensor on one thread (~15M entries/s),
        so inside the first merge, one tensor after another, a 0.5B model with 3 experts sorted for
        two minutes per direction and a 7B model would sort for ~23 minutes; side by side they take
        that divided by the cores. The sorts' temporaries (~20 bytes per entry while a tensor sorts)
        are held to half the memory the results leave free. Where the results themselves (4 bytes
        per entry and expert for exact pruning) would not fit in the memory available, the exact
        pruning orders go to memory-mapped files in `spill_dir` (default `self.spill_dir`; a
        warning says so; a candidate reads only their boundary slices) when it has the room, and
        otherwise `MergeError` names the fix, before anything is sorted. Adapter-mode recipes sort
        only small LoRA factors, on first use. `available`: bytes of memory free for the sorts
        (default: what the OS reports, `available_memory`).
        """
        from concurrent.futures import ThreadPoolExecutor

        from ._memory import ByteBudget

        start = time.perf_counter()
        work = self._sort_jobs(recipes)
        if not work:
            return time.perf_counter() - start
        free, spill = self._sort_memory(work, available, spill_dir or self.spill_dir)
        budget = ByteBudget(max(1 << 28, free // 2) if free is not None else 1 << 62)

        def run(job: "_SortJob") -> None:
            temporary = job.temporary
            budget.acquire(temporary)
            try:
                job.table.build_sort(job.delta, job.kind, spill)
            finally:
                budget.release(temporary)

        ranked = {id(job.table): job for job in work if job.kind != "rows"}
        with ThreadPoolExecutor(max_workers=max(1, threads or torch.get_num_threads())) as pool:
            # each table's histogram first: its two sort directions may then run in two threads
            list(pool.map(lambda job: job.table.ranks(job.delta), ranked.values()))
            list(pool.map(run, work))
        return time.perf_counter() - start

    def _sort_jobs(self, recipes: Iterable[MergeRecipe]) -> "list[_SortJob]":
        """The sorts `recipes` read that are not built yet, largest tensor first."""
        kinds: dict[tuple[str, str], set["SortKind"]] = {}
        for recipe in recipes:
            if recipe.lora_mode == "adapter":
                continue
            options = self._method_options(recipe)
            for item in self.check(recipe):
                if item.rule is None or not hasattr(item.method, "one_time_sort"):
                    continue
                for expert, p in zip(item.experts, item.params):
                    kind = item.method.one_time_sort(p, options)
                    if kind is not None:
                        kinds.setdefault((expert, item.name), set()).add(kind)
        work = []
        for (expert, name), wanted in kinds.items():
            delta = self._delta(expert, name)
            table = self._table(expert, name, delta)
            for kind in sorted(wanted):
                kept = table.sort_bytes(delta, kind)
                if kept:
                    work.append(_SortJob(table, delta, kind, kept))
        work.sort(key=lambda job: job.table.numel, reverse=True)
        return work

    @staticmethod
    def _sort_memory(work: "list[_SortJob]", available: int | None,
                     spill_dir: Path | None) -> tuple[int | None, Path | None]:
        """Where the sorts' results go: (memory they leave free, None = unknown; the folder the exact
        pruning orders are mapped from, None = memory). Raises `MergeError` when what they keep in
        host memory exceeds 90% of what is available and cannot go to `spill_dir`."""
        import shutil
        import warnings

        from ._memory import available_memory

        host = [job for job in work if job.kind != "rows" or job.delta.device.type == "cpu"]
        need = sum(job.kept for job in host)
        # one sort's temporaries come on top of what the finished ones keep: a 590M-entry embedding
        # (Gemma-2's) sorts with ~12 GB of them, which the kept results alone did not show
        largest = max((job.temporary for job in host), default=0)
        free = available if available is not None else available_memory()
        if free is None:
            return None, None
        if need + largest <= 0.9 * free:
            return free - need, None
        orders = sum(job.kept for job in host if job.kind != "rows")
        disk = None
        if spill_dir is not None and orders and need - orders + largest <= 0.9 * free:
            spill_dir.mkdir(parents=True, exist_ok=True)
            disk = shutil.disk_usage(spill_dir).free
            if orders <= 0.9 * disk:
                warnings.warn(f"exact pruning's sort orders need {orders / 1e9:.1f} GB and {free / 1e9:.1f} GB of memory is "
                              f"available: they are kept in memory-mapped files in {spill_dir} ({disk / 1e9:.1f} GB free "
                              "there; unlinked, gone when the process ends)", stacklevel=3)
                return free - (need - orders), spill_dir
        fix = ("set `pruning: approximate` in the spec (thresholds, no sorts; docs/merge-methods.md) or free memory"
               if orders else "free memory, or merge fewer tensors with DELLA")
        if disk is not None:
            fix += f" (or disk space: {spill_dir} has {disk / 1e9:.1f} GB free)"
        raise MergeError(f"the one-time sorts of this run's merges (mergekit's exact top-k order, DELLA's row ranks) "
                         f"need {(need + largest) / 1e9:.1f} GB of memory ({need / 1e9:.1f} GB kept for the run, "
                         f"{largest / 1e9:.1f} GB while the largest tensor sorts) and {free / 1e9:.1f} GB is available, "
                         f"of which 90% ({0.9 * free / 1e9:.1f} GB) may be used; {fix}")

    def _method_options(self, recipe: MergeRecipe) -> "MethodOptions":
        """The recipe's method-wide options (a rule's `t` is set per rule)."""
        from .methods import MethodOptions

        return MethodOptions(normalize=recipe.normalize, lambda_=recipe.lambda_, rescale=recipe.rescale, t=None,
                             seed=recipe.seed, draws=recipe.draws, pruning=recipe.pruning)

    def _trim_after_building(self, seed: int) -> None:
        """After an apply that built tables (the first one; DARE's windows again for a new seed), hand
        the heap pages their one-time temporaries left behind back to the OS: glibc keeps them, and
        they stayed in the process's resident set (~0.3-0.7 GB on the 0.5B benchmark) for the rest of
        a run. Later applies allocate nothing, so they skip it."""
        state = (len(self._tables), seed)
        if state != self._trimmed_after:
            self._trimmed_after = state
            trim()

    @property
    def fused(self) -> bool:
        """Whether `apply` uses the fused compiled kernels now (policy above, env override, no failed compile)."""
        from .methods._fused import disabled_reason

        env = os.environ.get("EVOMERGE_COMPILE", "").strip()
        wanted = env == "1" if env in ("0", "1") else self.compile in ("auto", True)
        return wanted and disabled_reason() is None

    def _apply_fused(self, plan: "ChunkPlan", dst: torch.Tensor, base: torch.Tensor, chunk: int,
                     stats: bool) -> "tuple[torch.Tensor, torch.Tensor] | tuple[()] | None":
        """`dst = base + merged` by the fused kernel; None when the plan has none or compiling failed
        (then nothing was written and the caller runs the eager path); () or (nonzero, l1) when done."""
        from .methods._fused import FusedGta, FusedUnavailable

        fused = FusedGta.of(plan)
        if fused is None:
            return None
        try:
            result = fused.apply(dst, base, max(chunk, FUSED_CHUNK_MIN), stats)
        except FusedUnavailable:
            return None
        return result if result is not None else ()

    def _apply_packed(self, items: "list[tuple[TensorPlan, ChunkPlan | torch.Tensor | None]]",
                      tensors: Mapping[str, torch.Tensor], chunk: int,
                      stats: bool) -> "tuple[set[str], tuple[torch.Tensor, torch.Tensor] | None] | None":
        """Merge the packed small tensors in one fused call (`_packed.py`); the names it wrote and
        its stats, or None when it did nothing (no arena, plans that cannot share it, failed compile)."""
        from .methods._fused import FusedUnavailable, PackedGta

        arena = self._packed_arena()
        if arena is None:
            return None
        index = {e: i for i, e in enumerate(self.expert_names)}
        plans = {item.name: (source, [index[e] for e in item.experts]) for item, source in items
                 if source is not None and not isinstance(source, torch.Tensor)}
        dsts = [tensors[name] for name in arena.names]
        if any(d.device != self.device or not d.is_contiguous() or d.dtype != dsts[0].dtype for d in dsts):
            return None
        fused = PackedGta.of([plans.get(name) for name in arena.names], len(self.expert_names), arena.row_starts)
        if fused is None:
            return None
        out, views = arena.out(dsts[0].dtype)
        try:
            result = fused.apply(out, arena.base, arena.deltas, arena.segment, arena.row_first,
                                 max(chunk, FUSED_CHUNK_MIN), stats)
        except FusedUnavailable:
            return None
        written = [i for i, joined in enumerate(fused.handled) if joined]
        torch._foreach_copy_([dsts[i] for i in written], [views[i] for i in written])
        return {arena.names[i] for i in written}, result

    def _packed_arena(self) -> "PackedArena | None":
        """The arena of tensors <= PACK_MAX_NUMEL entries, packed on first use (None: fewer than two, or
        a cache that is not on the merge device: the per-tensor path then serves them)."""
        if self._arena is None and not self._arena_tried:
            self._arena_tried = True
            names = [n for n in self.layout.slots if self._base[n].numel() <= PACK_MAX_NUMEL]
            if len(names) < 2 or self._cache_device != self.device:
                return None
            for expert in self.expert_names:
                for name in names:
                    self._delta(expert, name)  # materializes LoRA products and shared zeros into the cache
            tensors = [self._base[n] for n in names] + [self._deltas[e][n] for e in self.expert_names for n in names]
            if any(t.dtype != tensors[0].dtype or t.device != tensors[0].device for t in tensors):
                return None
            self._arena = PackedArena.pack(names, self._base, [self._deltas[e] for e in self.expert_names])
        return self._arena

    @property
    def chunk_elements(self) -> int:
        """Flat chunk length of the in-place merge (by device type; see `methods.CHUNK_ELEMENTS`)."""
        return self._chunk if self._chunk else chunk_elements(self.device)

    @chunk_elements.setter
    def chunk_elements(self, value: int | None) -> None:
        if value is not None and value < 1:
            raise MergeError(f"chunk_elements must be >= 1, got {value}")
        self._chunk = value

    def iter_merged(self, recipe: MergeRecipe) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged tensor in the model dtype) one at a time, for exports.

        With the fused kernels on, `apply` itself writes the recipe into one fresh state dict, so an
        export holds exactly the bits a scorer scored: a separate eager pass rounds a few bf16
        entries differently (multiply-add contraction, docs/merge-engine.md). That costs one model
        of memory while exporting, what the scorer's live model costs during a search. The eager
        engine streams one tensor at a time, as its apply computes them. The recipe's one-time sorts
        run first, side by side (`build_sorts`)."""
        self.build_sorts([recipe])
        if self.fused:
            target = {name: torch.empty_like(self._base[name]) for name in self.layout.slots}
            self.apply(recipe, target, stats=False)
            for name in list(target):
                yield name, target.pop(name)
            return
        for name, delta in self._merged_deltas(recipe):
            base = self._base[name]
            yield name, (base.clone() if delta is None else (delta + base).to(self.dtype))

    def merged_state(self, recipe: MergeRecipe) -> dict[str, torch.Tensor]:
        """The whole merged state dict (one extra model in memory)."""
        return dict(self.iter_merged(recipe))

    def _merged_deltas(self, recipe: MergeRecipe) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Per tensor the whole merged task vector in a reused fp32 buffer (valid until the next item)."""
        for item, source in self._sources(recipe):
            name = item.name
            if source is None or isinstance(source, torch.Tensor):
                yield name, source
                continue
            out = self._buffer(tuple(self._base[name].shape), 0)
            run_plan(source, out, self.chunk_elements)
            yield name, out

    def _sources(self, recipe: MergeRecipe) -> Iterator[tuple[TensorPlan, "ChunkPlan | torch.Tensor | None"]]:
        """Per tensor: None (keep the base), a chunk plan (dense), or a whole fp32 delta (adapter mode)."""
        options = self._method_options(recipe)
        for item in self.check(recipe):
            if item.rule is None:
                yield item, None
                continue
            opts = options if item.rule.t is None else replace(options, t=item.rule.t)
            if recipe.lora_mode == "adapter":
                yield item, self._adapter_delta(recipe, item, opts)
            else:
                yield item, self._dense_plan(recipe, item, opts)

    def _dense_plan(self, recipe: MergeRecipe, item: TensorPlan, options: MethodOptions) -> "ChunkPlan":
        name, method = item.name, item.method
        base = self._base[name]
        deltas = [self._delta(e, name) for e in item.experts]
        tables = [self._table(e, name, d) for e, d in zip(item.experts, deltas)] if item.needs_tables else None
        generator = None
        if method.is_random:
            from .methods import mask_generator

            generator = mask_generator(recipe.seed, recipe.trial, name, self.device)
        try:
            return method.prepare(deltas, item.params, base=base if base.device == self.device else base.to(self.device),
                                  options=options, tables=tables,
                                  generator=generator, chunk=self.chunk_elements)
        except ValueError as exc:  # parameter combinations only the method can judge (e.g. DELLA's epsilon)
            raise MergeError(f"tensor {name}, method {method.name!r}: {exc}") from None

    def _adapter_delta(self, recipe: MergeRecipe, item: TensorPlan, options: MethodOptions) -> torch.Tensor | None:
        """LoraHub / Evo-Merging form: A' = method(A_i), B' = sum w_i s_i B_i, delta = B' @ A'."""
        name = item.name
        pairs = [(e, self._adapters[e].modules.get(name), p) for e, p in zip(item.experts, item.params)]
        pairs = [(e, m, p) for e, m, p in pairs if m is not None]
        if not pairs:
            return None
        merged = self._merge_factors(recipe, item, pairs, options)
        out = self._buffer(tuple(self._base[name].shape), 0)
        out.copy_(merged.delta())
        return out

    def _merge_factors(self, recipe: MergeRecipe, item: TensorPlan, pairs: list[tuple[str, LoraModule, ExpertParams]], options: MethodOptions) -> LoraModule:
        from .methods import mask_generator

        name, method = item.name, item.method
        ranks = {m.rank for _, m, _ in pairs}
        if len(ranks) > 1:
            raise MergeError(f"adapter mode needs equal LoRA ranks per tensor; {name} has ranks {sorted(ranks)} across {[e for e, _, _ in pairs]}; use lora_mode='materialized'")
        a_list = [m.a.to(self.device) for _, m, _ in pairs]
        tables = [self._table(f"{e}:lora_A", name, a) for (e, _, _), a in zip(pairs, a_list)] if item.needs_tables else None
        generator = mask_generator(recipe.seed, recipe.trial, f"{name}.lora_A", self.device) if method.is_random else None
        a_out = torch.empty(a_list[0].shape, dtype=torch.float32, device=self.device)
        method.merge(a_out, a_list, [p for _, _, p in pairs], base=torch.zeros_like(a_out), options=options, tables=tables, generator=generator)
        # B is never pruned (Evo-Merging's asymmetric pruning): a plain weighted sum, scales folded in.
        b_out = torch.zeros(pairs[0][1].b.shape, dtype=torch.float32, device=self.device)
        for _, m, p in pairs:
            b_out.add_(m.b.to(self.device).float(), alpha=p.weight * m.scale)
        first = pairs[0][1]
        return LoraModule(a=a_out, b=b_out, scale=1.0, embedding=first.embedding, fan_in_fan_out=first.fan_in_fan_out)

    def merged_adapter(self, recipe: MergeRecipe) -> dict[str, LoraModule]:
        """Adapter-mode merge of the LoRA factors per base tensor (scale folded into B)."""
        options = self._method_options(recipe)
        result: dict[str, LoraModule] = {}
        with torch.no_grad():
            for item in self.check(recipe):
                if item.rule is None:
                    continue
                pairs = [(e, self._adapters[e].modules.get(item.name), p) for e, p in zip(item.experts, item.params)]
                pairs = [(e, m, p) for e, m, p in pairs if m is not None]
                if pairs:
                    result[item.name] = self._merge_factors(recipe, item, pairs, options)
        return result

    # ------------------------------------------------------------------ caches
    def _delta(self, expert: str, name: str) -> torch.Tensor:
        """An expert's task vector for one tensor; LoRA experts materialize scale*B@A on first use."""
        if expert not in self._deltas:
            self._deltas[expert] = {}
        cache = self._deltas[expert]
        delta = cache.get(name)
        if delta is None:
            adapter = self._adapters[expert]
            if name in adapter.modules:
                delta = _store(adapter.modules[name].delta(torch.float32).to(self.dtype), self._cache_device, self._pin)
            elif name in adapter.full:
                delta = _store((adapter.full[name].to(self._cache_device).float() - self._base[name].float()).to(self.dtype), self._cache_device, self._pin)
            else:
                delta = self._zero(tuple(self._base[name].shape))
            cache[name] = delta
        return delta if delta.device == self.device else delta.to(self.device, non_blocking=True)

    def task_vector(self, expert: str, name: str) -> torch.Tensor:
        """An expert's cached task vector (expert - base) of one tensor, in the model dtype (read-only
        by convention; a LoRA expert's is materialized on first use)."""
        if expert not in self.expert_paths:
            raise MergeError(f"unknown expert {expert!r}; the engine has experts {self.expert_names}")
        if name not in self._base:
            raise MergeError(f"unknown tensor {name!r}; see engine.layout.slots for the merged tensors")
        return self._delta(expert, name)

    def _zero(self, shape: tuple[int, ...]) -> torch.Tensor:
        # One shared zero task vector per shape for tensors a LoRA expert does not touch.
        if shape not in self._zeros:
            self._zeros[shape] = torch.zeros(shape, dtype=self.dtype, device=self._cache_device)
        return self._zeros[shape]

    def _table(self, expert: str, name: str, delta: torch.Tensor) -> MagnitudeTable:
        table = self._tables.get((expert, name))
        if table is None:  # built once per (expert, tensor); looked up per candidate
            from .methods import MagnitudeTable

            table = self._tables[(expert, name)] = MagnitudeTable.build(delta, identity=f"{expert}\x1f{name}")
        return table

    def _buffer(self, shape: tuple[int, ...], slot: int) -> torch.Tensor:
        key = (shape, slot)
        if key not in self._scratch:
            self._scratch[key] = torch.empty(shape, dtype=torch.float32, device=self.device)
        return self._scratch[key]

    @property
    def lora_expert_names(self) -> list[str]:
        """Experts loaded from PEFT LoRA adapters (the others are full models)."""
        return [n for n in self.expert_names if n in self._adapters]

    def adapter(self, name: str) -> LoraAdapter:
        """The loaded PEFT adapter of a LoRA expert."""
        if name not in self._adapters:
            raise MergeError(f"expert {name!r} is not a LoRA adapter; LoRA experts: {sorted(self._adapters)}")
        return self._adapters[name]

    def weight_bytes(self) -> int:
        """Bytes of the merged weights an export writes (every tensor in the model dtype)."""
        return sum(self._base[n].numel() * self._base[n].element_size() for n in self.layout.slots)

    def base_tensor(self, name: str) -> torch.Tensor:
        """The cached base weight of one tensor (read-only by convention)."""
        return self._base[name]

    # ------------------------------------------------------------------ export
    def export(self, recipe: MergeRecipe, out_dir: str | Path, *, shard_size: str | int = "2GB") -> Path:
        """HF folder + tokenizer + README.md card + recipe.json + mergekit.yaml (when expressible)."""
        from ._export import export_model

        return export_model(self, recipe, Path(out_dir), shard_size=shard_size)

    def export_lora(self, recipe: MergeRecipe, out_dir: str | Path) -> Path:
        """The adapter-mode merge of the LoRA experts as one PEFT adapter folder."""
        from ._export import export_adapter

        return export_adapter(self, recipe, Path(out_dir))


def _load_adapter(folder: Path, label: str, shapes: Mapping[str, tuple[int, ...]], device: torch.device, dtype: torch.dtype) -> LoraAdapter:
    adapter = LoraAdapter.load(folder, label)
    for name, module in adapter.modules.items():
        if name not in shapes:
            raise MergeError(f"{label}: LoRA targets {name}, which the base model lacks; was it trained on another base?")
        out_in = (module.b.shape[0], module.a.shape[1])
        want = shapes[name][::-1] if module.embedding or module.fan_in_fan_out else shapes[name]
        if tuple(want) != out_in:
            raise MergeError(f"shape mismatch: {label} LoRA for {name} gives {out_in}, base has {tuple(shapes[name])}")
        module.a, module.b = module.a.to(device), module.b.to(device)
    for name, tensor in adapter.full.items():
        if name not in shapes or tuple(tensor.shape) != tuple(shapes[name]):
            raise MergeError(f"{label}: saved module tensor {name} {tuple(tensor.shape)} does not match the base {shapes.get(name)}")
    return adapter


def _subtract(value: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`value - base` rounded once into a new `dtype` tensor, without temporaries: torch computes
    bf16/fp16 arithmetic in fp32 and rounds the result, so this equals `(value.float() - base.float())`
    cast to `dtype` (a chunked version of that allocated fp32 pieces per tensor, whose freed holes
    between the task vectors kept ~0.15 GB per expert resident while loading a 1.25B model)."""
    if value.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        value = value.float()  # fp64 (pickles): round to fp32 first, as every other input is
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    return torch.sub(value, base, out=out)


def _align_rows(value: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """vocab_policy='truncate': keep the base's rows; rows an expert lacks keep the base weights."""
    rows = base.shape[0]
    if value.shape[0] >= rows:
        return value[:rows]
    return torch.cat([value, base[value.shape[0]:].to(value.device, value.dtype)])


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _cache_device(device: torch.device, copies: int, numel: int, dtype: torch.dtype) -> torch.device:
    """`device`, unless the cache (base + task vectors) does not fit there: then CPU (pinned)."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    need = copies * numel * torch.empty((), dtype=dtype).element_size()
    # Leave room for the target model and activations: the cache may use 70% of free memory.
    return device if need < 0.7 * free else torch.device("cpu")


def _store(tensor: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    """Move to the cache device; a CPU cache is pinned only when a CUDA merge will read it."""
    tensor = tensor.to(device).contiguous()
    if pin:
        tensor = tensor.pin_memory()
    return tensor


class _NoBar:
    def update(self, n: int) -> None:
        """No progress display."""

    def close(self) -> None:
        """No progress display."""


def _progress(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", leave=False)
