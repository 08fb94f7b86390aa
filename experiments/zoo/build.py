"""Builds the toy zoo: base LM, full experts, LoRA experts, LoRA pool, data, manifest.

Why it is built this way (measured while planning): experts fine-tuned hard from a base
that never saw the skill formats give task vectors that do not merge, while a base trained
to competence on the skills leaves nothing for experts to add. So the base is pretrained
briefly on a generic copy task plus a small share of every skill (broad, weak competence),
and the experts are short low-LR fine-tunes inside that basin.

The build is deterministic for a given (size, seed, arch, tie) on one machine: every random
stream is derived from the seed, and the torch thread count is fixed during the build. It
writes into a temporary sibling directory and renames it into place when complete, so a
killed build never leaves a directory that looks like a zoo.
"""
from __future__ import annotations

import copy
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from ...merge import quiet_transformers
from ._cache import ZooBuildError, build_cached, cache_root
from .architecture import ARCHS, make_config
from .arithmetic import task_arithmetic
from .evaluation import accuracy
from .manifest import write_manifest
from .sizes import ZOO_SIZES, ZooSize
from .skills import COPY, SKILLS, Example, sample_unique, skill_rng, write_jsonl
from .tokenizer import build_tokenizer
from .training import train

#: Bump whenever the output of a build changes; it is part of the cache key.
BUILDER_VERSION = "3"
#: Fixed during the build: CPU matmul reductions depend on the thread count. One thread:
#: the matrices are too small to gain much from more, the result does not depend on the
#: machine's core count, and OpenMP threads collapse when other jobs share the CPU
#: (measured: a 2-thread build under load ran several times slower than a 1-thread one).
BUILD_THREADS = 1
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def default_zoo_dir(size: str, seed: int, arch: str, tie_word_embeddings: bool = False) -> Path:
    """``$EVOMERGE_CACHE/zoo/<size>-<arch>-seed<N>`` (``-tied`` appended for tied embeddings)."""
    return cache_root() / "zoo" / f"{size}-{arch}-seed{seed}{'-tied' if tie_word_embeddings else ''}"


def _cache_key(size: str, seed: int, arch: str, tie: bool) -> dict:
    return {"builder_version": BUILDER_VERSION, "size": size, "seed": seed, "arch": arch, "tie_word_embeddings": tie}


def derive_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed that depends only on (seed, keys): one independent stream per model."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def build_zoo(
    size: str = "small",
    seed: int = 0,
    arch: str = "llama",
    out: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    tie_word_embeddings: bool = False,
) -> Path:
    """Build the zoo (or find it cached) and return its directory.

    A complete zoo with the same cache key (size, seed, arch, tie, builder version) is
    returned at once unless ``force``. See the module docstring for why it is built so.
    """
    if size not in ZOO_SIZES:
        raise ZooBuildError(f"unknown size {size!r}; expected one of {', '.join(ZOO_SIZES)}")
    if arch not in ARCHS:
        raise ZooBuildError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    out_dir = Path(out).expanduser().resolve() if out is not None else default_zoo_dir(size, seed, arch, tie_word_embeddings)
    key = _cache_key(size, seed, arch, tie_word_embeddings)
    return build_cached(
        out_dir, key, lambda tmp: _build_into(tmp, out_dir, ZOO_SIZES[size], seed, arch, tie_word_embeddings, progress, key),
        force=force, threads=int(os.environ.get("EVOMERGE_ZOO_THREADS", BUILD_THREADS)), error=ZooBuildError, what="zoo",
    )


# --------------------------------------------------------------------------- data


def _make_data(spec: ZooSize, seed: int) -> dict[str, dict[str, list[Example]]]:
    """Per skill: calib, test (disjoint), expert train, base-mixture train; all prompts disjoint from test/calib."""
    data: dict[str, dict[str, list[Example]]] = {}
    for i, name in enumerate(spec.skills):
        skill = SKILLS[name]
        calib = sample_unique(skill, skill_rng(seed, 10, i, 0), spec.n_calib)
        test = sample_unique(skill, skill_rng(seed, 10, i, 1), spec.n_test, exclude=[e.prompt for e in calib])
        held = {e.prompt for e in calib + test}
        n_pool = max(spec.expert_n_train, spec.pool.n_train)
        train_set = sample_unique(skill, skill_rng(seed, 11, i), n_pool, exclude=held)
        base_set = sample_unique(skill, skill_rng(seed, 12, i), spec.base_n_train, exclude=held,
                                 lo=spec.base_skill_len[0], hi=spec.base_skill_len[1])
        data[name] = {"calib": calib, "test": test, "train": train_set, "base": base_set}
    return data


# --------------------------------------------------------------------------- models


def _save_hf(model: PreTrainedModel, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _lora_model(base: PreTrainedModel, rank: int, torch_seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(torch_seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")
    return get_peft_model(copy.deepcopy(base), cfg)


def _save_adapter(peft_model, path: Path, base_path: Path) -> None:
    # The recorded base path is informational (PeftModel.from_pretrained takes the base model
    # object); point it at where the base will live once the build is published.
    peft_model.peft_config["default"].base_model_name_or_path = str(base_path)
    with warnings.catch_warnings():  # peft looks for the base there, which is published later
        warnings.filterwarnings("ignore", message="Could not find a config file")
        peft_model.save_pretrained(path, safe_serialization=True)


class _Progress:
    """One tqdm bar over all build jobs, with the current job and its loss as postfix."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.bar = tqdm(total=total, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True, leave=True)

    def step(self, job: str):
        def on_step(step: int, loss: float) -> None:
            self.bar.update(1)
            if step % 20 == 0:
                self.bar.set_postfix_str(f"{job} loss={loss:.3f}", refresh=False)

        return on_step

    def tick(self, job: str, n: int = 1) -> None:
        self.bar.set_postfix_str(job, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _plan_pool(spec: ZooSize) -> list[dict]:
    """The pool: clean adapters, near-duplicates (continued from a clean one), small-data and noise."""
    p = spec.pool
    plan: list[dict] = []
    for i, skill in enumerate(spec.skills):
        for k in range(p.clean_per_skill):
            plan.append(dict(name=f"{skill}-clean{k}", skill=skill, variant="clean", key=(i, 0, k),
                             n_train=p.n_train if k == 0 else p.n_train_alt, steps=p.steps))
        for k in range(p.near_duplicate_per_skill):
            plan.append(dict(name=f"{skill}-neardup{k}", skill=skill, variant="near_duplicate", key=(i, 1, k),
                             n_train=p.n_train, steps=p.near_duplicate_steps, parent=f"{skill}-clean0"))
        for k in range(p.small_data_per_skill):
            plan.append(dict(name=f"{skill}-small{k}", skill=skill, variant="small_data", key=(i, 2, k),
                             n_train=p.n_small, steps=p.steps))
    for k in range(p.noise_total):
        i = k % len(spec.skills)
        plan.append(dict(name=f"noise{k}-{spec.skills[i]}", skill=spec.skills[i], variant="noise", key=(i, 3, k),
                         n_train=p.n_train, steps=p.steps))
    return plan


def _build_into(tmp: Path, final: Path, spec: ZooSize, seed: int, arch: str, tie: bool, progress: bool, key: dict) -> None:
    t0 = time.perf_counter()
    skills = list(spec.skills)
    pool_plan = _plan_pool(spec)
    lora_skills = skills[: spec.n_lora_experts]
    total = (spec.base_steps + len(skills) * spec.expert_steps + len(lora_skills) * spec.lora_steps
             + sum(e["steps"] for e in pool_plan) + (1 + len(skills) + len(lora_skills) + 2 + len(pool_plan)))
    bar = _Progress(total, progress, f"zoo {spec.name}-{arch}-seed{seed}")
    tokenizer = build_tokenizer()
    training: dict[str, dict] = {}
    acc: dict[str, dict[str, float]] = {}

    data = _make_data(spec, seed)
    for name in skills:
        write_jsonl(tmp / "data" / name / "calib.jsonl", data[name]["calib"])
        write_jsonl(tmp / "data" / name / "test.jsonl", data[name]["test"])

    def evaluate(model_name: str, model: torch.nn.Module) -> None:
        acc[model_name] = {s: accuracy(model, data[s]["test"]) for s in skills}
        bar.tick(f"eval {model_name}")

    # Base: generic copy task plus a small share of every skill.
    config = make_config(arch, spec, tie_word_embeddings=tie)
    torch.manual_seed(derive_seed(seed, 20))
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    copy_set = sample_unique(COPY, skill_rng(seed, 12, 99), 4 * spec.base_n_train)
    mixture = copy_set + [ex for s in skills for ex in data[s]["base"]]
    share = spec.base_skill_share / len(skills)
    weights = np.array([(1 - spec.base_skill_share) / len(copy_set)] * len(copy_set)
                       + [share / spec.base_n_train] * (spec.base_n_train * len(skills)))
    training["base"] = train(base, mixture, steps=spec.base_steps, lr=spec.base_lr, batch_size=spec.batch_size,
                             rng=skill_rng(seed, 21), weights=weights, warmup=spec.base_steps // 10,
                             weight_decay=0.01, on_step=bar.step("base")).to_dict()
    training["base"].update(skill_share=spec.base_skill_share, skill_len=list(spec.base_skill_len),
                            seed=derive_seed(seed, 20))
    _save_hf(base, tokenizer, tmp / "base")
    evaluate("base", base)
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}

    # Full experts: short low-LR fine-tunes from the base.
    expert_sds = []
    for i, s in enumerate(skills):
        model = copy.deepcopy(base)
        torch.manual_seed(derive_seed(seed, 30, i))
        examples = data[s]["train"][: spec.expert_n_train]
        r = spec.expert_replay
        ex_weights = np.concatenate([np.full(len(examples), (1 - r) / len(examples)), r * weights / weights.sum()])
        training[f"expert:{s}"] = train(model, examples + mixture, steps=spec.expert_steps, lr=spec.expert_lr,
                                        batch_size=spec.batch_size, rng=skill_rng(seed, 31, i), weights=ex_weights,
                                        warmup=spec.expert_steps // 10, on_step=bar.step(f"expert:{s}")).to_dict()
        training[f"expert:{s}"].update(replay=r, skill_examples=len(examples), seed=derive_seed(seed, 30, i))
        _save_hf(model, tokenizer, tmp / "experts" / s)
        evaluate(f"expert:{s}", model)
        expert_sds.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        del model

    # LoRA experts (PEFT format).
    for s in lora_skills:
        i = skills.index(s)
        pm = _lora_model(base, spec.lora_rank, derive_seed(seed, 40, i))
        examples = data[s]["train"][: spec.expert_n_train]
        training[f"lora:{s}"] = train(pm, examples, steps=spec.lora_steps, lr=spec.lora_lr, batch_size=spec.batch_size,
                                      rng=skill_rng(seed, 41, i), warmup=spec.lora_steps // 10,
                                      on_step=bar.step(f"lora:{s}")).to_dict()
        training[f"lora:{s}"].update(rank=spec.lora_rank, seed=derive_seed(seed, 40, i))
        _save_adapter(pm, tmp / "adapters" / f"{s}-lora", final / "base")
        evaluate(f"lora:{s}", pm)
        del pm

    # Reference merges: uniform task arithmetic of the full experts, weight 1/n and 1.
    live = copy.deepcopy(base)
    merges = {"task_arithmetic:uniform": 1.0 / len(skills), "task_arithmetic:sum": 1.0}
    for name, w in merges.items():
        live.load_state_dict(task_arithmetic(base_sd, expert_sds, w))
        evaluate(name, live)
    del live, expert_sds

    # LoRA pool.
    pool_entries: list[dict] = []
    parents: dict[str, object] = {}
    p = spec.pool
    for entry in pool_plan:
        s, i = entry["skill"], skills.index(entry["skill"])
        seed_e = derive_seed(seed, 50, *entry["key"])
        rng = skill_rng(seed, 51, *entry["key"])
        examples = list(data[s]["train"][: entry["n_train"]]) if entry["variant"] != "small_data" else \
            [data[s]["train"][j] for j in rng.choice(len(data[s]["train"]), size=entry["n_train"], replace=False)]
        lr = p.lr
        if entry["variant"] == "noise":
            # Shuffled targets: right format, wrong content. Choosing/denoising must reject these.
            perm = rng.permutation(len(examples))
            examples = [Example(ex.prompt, examples[j].answer) for ex, j in zip(examples, perm)]
        if entry["variant"] == "near_duplicate":
            pm = copy.deepcopy(parents[entry["parent"]])
            lr = p.lr * 0.3
        else:
            pm = _lora_model(base, p.rank, seed_e)
        torch.manual_seed(seed_e)
        res = train(pm, examples, steps=entry["steps"], lr=lr, batch_size=spec.batch_size // 2, rng=rng,
                    warmup=0, on_step=bar.step(f"pool:{entry['name']}"))
        training[f"pool:{entry['name']}"] = {**res.to_dict(), "seed": seed_e}
        _save_adapter(pm, tmp / "pool" / entry["name"], final / "base")
        evaluate(f"pool:{entry['name']}", pm)
        if entry["variant"] == "clean":
            parents[entry["name"]] = pm
        rec = {"name": entry["name"], "path": f"pool/{entry['name']}", "skill": s, "variant": entry["variant"],
               "seed": seed_e, "n_train": entry["n_train"], "rank": p.rank, "steps": entry["steps"], "lr": lr}
        if "parent" in entry:
            rec["parent"] = entry["parent"]
        pool_entries.append(rec)
    parents.clear()
    bar.close()

    manifest = {
        **key,
        "skills": skills,
        "base": "base",
        "experts": {s: f"experts/{s}" for s in skills},
        "lora_experts": {s: f"adapters/{s}-lora" for s in lora_skills},
        "pool": pool_entries,
        "data": {s: {"calib": f"data/{s}/calib.jsonl", "test": f"data/{s}/test.jsonl"} for s in skills},
        "merges": {name: {"method": "task_arithmetic", "weight": w, "experts": [f"expert:{s}" for s in skills]}
                   for name, w in merges.items()},
        "accuracy": acc,
        "training": training,
        "model": {"architecture": type(base).__name__, "n_params": sum(p.numel() for p in base.parameters()),
                  "hidden_size": spec.hidden_size, "num_layers": spec.num_layers, "head_dim": spec.hidden_size // spec.num_heads,
                  "lora_targets": LORA_TARGETS},
        "size_spec": spec.to_dict(),
        "metric": "exact match of greedy generation (text up to EOS/newline, stripped) on data/<skill>/test.jsonl",
        "build_threads": torch.get_num_threads(),
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    write_manifest(tmp, manifest)
