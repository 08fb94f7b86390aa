"""Zoo sizes: model shape, training budgets and split sizes per named size.

A size is data, not code, so the builder stays one path for every size and the cache key
(size, seed, arch, builder version) fully determines the output.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

ARCHS = ("llama", "qwen2", "mistral")
"""The base architectures a zoo can be built with (`architecture.make_config`)."""


@dataclass(frozen=True)
class PoolSpec:
    """How many pool adapters of each variant to train per skill (see ``build.plan_pool``)."""

    clean_per_skill: int = 1
    near_duplicate_per_skill: int = 1
    small_data_per_skill: int = 1
    noise_total: int = 2
    n_train: int = 512
    n_train_alt: int = 256  # data size of the second clean adapter of a skill
    n_small: int = 32
    steps: int = 40
    near_duplicate_steps: int = 8
    lr: float = 3e-3
    rank: int = 4


@dataclass(frozen=True)
class ZooSize:
    """Everything that differs between ``tiny`` and ``small``."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    skills: tuple[str, ...]
    batch_size: int
    # base: pretrained on a mixture of a generic copy task and a small share of every skill,
    # so the experts start inside a shared basin (their deltas then merge).
    base_steps: int
    base_lr: float
    base_skill_share: float  # fraction of base batches drawn from the skills (rest: copy)
    base_n_train: int  # examples per skill in the base mixture
    base_skill_len: tuple[int, int]  # operand lengths the base sees (shorter than the experts')
    # experts: short, low-LR full fine-tunes from the base
    expert_steps: int
    expert_lr: float
    expert_n_train: int
    # share of expert batches replayed from the base mixture: keeps experts in the base's
    # basin (as real experts keep general ability), which is what makes their deltas merge
    expert_replay: float
    n_lora_experts: int  # LoRA experts for the first n skills
    lora_rank: int
    lora_steps: int
    lora_lr: float
    n_calib: int
    n_test: int
    pool: PoolSpec = field(default_factory=PoolSpec)
    max_position_embeddings: int = 256

    def to_dict(self) -> dict:
        return asdict(self)


ZOO_SIZES: dict[str, ZooSize] = {
    "tiny": ZooSize(
        name="tiny",
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=128,
        skills=("rev", "sort", "shift", "dup"),
        batch_size=32,
        base_steps=300,
        base_lr=3e-3,
        base_skill_share=0.5,
        base_n_train=512,
        base_skill_len=(2, 4),
        expert_steps=150,
        expert_lr=3e-3,
        expert_n_train=512,
        expert_replay=0.3,
        n_lora_experts=1,
        lora_rank=4,
        lora_steps=80,
        lora_lr=5e-3,
        n_calib=16,
        n_test=48,
        pool=PoolSpec(n_train=256, n_train_alt=128, n_small=16, steps=8, near_duplicate_steps=2, noise_total=2,
                      clean_per_skill=1, near_duplicate_per_skill=1, small_data_per_skill=1, lr=5e-3, rank=2),
    ),
    "small": ZooSize(
        name="small",
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=384,
        skills=("rev", "sort", "shift", "dup"),
        batch_size=64,
        base_steps=400,
        base_lr=3e-3,
        base_skill_share=0.15,
        base_n_train=2048,
        base_skill_len=(2, 4),
        expert_steps=160,
        expert_lr=1e-3,
        expert_n_train=2048,
        expert_replay=0.3,
        n_lora_experts=2,
        lora_rank=8,
        lora_steps=120,
        lora_lr=3e-3,
        n_calib=64,
        n_test=200,
        pool=PoolSpec(clean_per_skill=2),
    ),
}
