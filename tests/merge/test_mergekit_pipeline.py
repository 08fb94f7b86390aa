"""Every mergekit method through mergekit 0.1.5's full pipeline: `engine.export` writes the model
and its mergekit.yaml, mergekit's `run_merge` rebuilds it from that YAML, and the two must agree
tensor for tensor (docs/merge-methods.md, "What is equal to what").

The models are as small as allows tensors above 2**18 entries (the sizes where magnitude tables used
to be sampled): a 2-layer Llama whose embedding and head are 512 x 576; per-layer recipes with
different values for layer 1, the head and the embedding; two full experts and a LoRA expert (its
adapter also targets the head). bf16 experts are `base * (1 + r)`, |r| <= 0.3, so `expert - base` is
exact in bf16 (Sterbenz) and mergekit's fp32 arithmetic sees the very task vectors evomerge ranks;
the bf16 LoRA factors are on a coarse grid for the same reason. Both dtypes are full of magnitude
ties (bf16 values), the case mergekit's unstable sort decides.

Tolerance: fp32 within 2e-6 relative (the linear combine folds lambda / divisor into one multiply-add,
mergekit divides after summing); bf16 within 1 ulp of the output (the same fp32 value up to that
rounding, rounded once), or 2**-20 of the base weight where the merge cancels to ~0 (there fp32
rounding of the inputs is larger than an ulp of the output). A different kept entry differs by a whole weighted task-vector entry (tens
of ulps here), so these bounds check the selection mask to the entry.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from evomerge.merge import ExpertParams, GroupRule, MergeEngine, MergeRecipe
from evomerge.merge.methods import mergekit_seed

BIG = (512, 576)  # 294,912 entries > 2**18
EXPERTS = ("a", "b", "lora")
RANDOM_TENSOR = "lm_head.weight"


def _config(dtype: torch.dtype) -> LlamaConfig:
    config = LlamaConfig(vocab_size=BIG[0], hidden_size=BIG[1], intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=32,
                         tie_word_embeddings=False)
    config.dtype = str(dtype).removeprefix("torch.")
    return config


def _family(root: Path, dtype: torch.dtype) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_config(dtype), dtype=torch.float32).to(dtype)
    base.save_pretrained(root / "base")
    paths = {"base": root / "base"}
    for seed, name in ((1, "a"), (2, "b")):
        g = torch.Generator().manual_seed(seed)
        expert = AutoModelForCausalLM.from_pretrained(root / "base", dtype=dtype)
        with torch.no_grad():
            for p in expert.parameters():
                r = (torch.rand(p.shape, generator=g) * 2 - 1) * 0.3
                p.copy_((p.float() * (1 + r)).to(dtype))
        expert.save_pretrained(root / name)
        paths[name] = root / name
    model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "down_proj", "lm_head"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                if dtype == torch.bfloat16:  # products on a 2**-13 grid with <= 7 significant bits
                    scale = 2.0**-7 if "lora_A" in name else 2.0**-6
                    p.copy_(torch.randint(-7, 8, p.shape, generator=g).float() * scale)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lora.save_pretrained(root / "lora", save_embedding_layers=False)
    paths["lora"] = root / "lora"
    return paths


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    dtype = request.param
    root = tmp_path_factory.mktemp(f"pipeline_{str(dtype).removeprefix('torch.')}")
    paths = _family(root, dtype)
    engine = MergeEngine.load(paths["base"], {e: paths[e] for e in EXPERTS}, progress=False)
    # mergekit materializes the LoRA expert into lora_cache on its first run, drawing from the global
    # RNG its random methods then draw from: one warm-up run, so DELLA/DARE match in any test order
    # (run first, fp32 della failed on lm_head)
    _run_both("linear", (dtype, root, engine), root / "warm-up")
    return dtype, root, engine


def _rules(method: str) -> list[GroupRule]:
    """Per-layer rules: everything, then layer 1, the head and the embedding with other values."""
    values = [  # per rule: expert -> (weight, density, gamma, epsilon)
        {"a": (0.5, 0.3, 0.02, 0.1), "b": (0.3, 0.6, 0.1, 0.2), "lora": (0.4, 0.45, 0.0, 0.05)},
        {"a": (0.2, 0.7, 0.05, 0.2), "b": (0.9, 0.25, 0.3, 0.1), "lora": (-0.3, 0.8, 0.01, 0.1)},
        {"a": (1.0, 0.15, 0.01, 0.1), "b": (-0.2, 0.5, 0.2, 0.3), "lora": (0.6, 0.35, 0.05, 0.2)},
        {"a": (0.7, 0.55, 0.0, 0.25), "b": (0.4, 0.05, 0.4, 0.04), "lora": (0.2, 0.95, 0.02, 0.04)},
    ]
    selectors = [{}, {"layers": [1]}, {"layers": ["head"]}, {"layers": ["embed"]}]
    random = method.startswith(("dare", "della"))
    uses = {"weight", "density"} | ({"gamma"} if "breadcrumbs" in method else set()) | ({"epsilon"} if "della" in method else set())
    if method in ("linear", "task_arithmetic", "nuslerp"):
        uses = {"weight"}
    names = ("a", "b") if method == "nuslerp" else EXPERTS
    rules = []
    for i, (select, table) in enumerate(zip(selectors, values)):
        experts = {}
        for name in names:
            w, d, gamma, eps = table[name]
            if random and select != {"layers": ["head"]}:
                d = 1.0  # mergekit draws from one global stream: only the head draws (see the DARE test below)
            full = {"weight": w, "density": d, "gamma": gamma, "epsilon": eps}
            experts[name] = ExpertParams(**{k: v for k, v in full.items() if k in uses})
        if method == "slerp":
            rules.append(GroupRule(method=method, t=(0.3, 0.7, 0.5, 0.9)[i], experts={"a": ExpertParams()}, **select))
        elif method == "model_stock":
            rules.append(GroupRule(method=method, experts={n: ExpertParams() for n in EXPERTS}, **select))
        else:
            rules.append(GroupRule(method=method, experts=experts, **select))
    return rules


_OPTIONS = {  # method -> recipe-wide options (normalize, lambda)
    "linear": (True, 1.0), "task_arithmetic": (False, 0.8), "ties": (True, 1.1), "breadcrumbs": (False, 1.0),
    "breadcrumbs_ties": (True, 0.9), "dare_linear": (False, 1.0), "dare_ties": (True, 1.0), "della": (True, 1.0),
    "della_linear": (False, 1.2), "slerp": (True, 1.0), "nuslerp": (True, 1.0), "model_stock": (True, 1.0),
}


def _run_both(method: str, family, tmp_path: Path) -> tuple[dict, dict, str]:
    dtype, root, engine = family
    normalize, lambda_ = _OPTIONS[method]
    recipe = MergeRecipe(rules=_rules(method), normalize=normalize, lambda_=lambda_, draws="mergekit", seed=7, trial=3)
    ours = engine.export(recipe, tmp_path / "ours")
    text = (ours / "mergekit.yaml").read_text()
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    options = MergeOptions(random_seed=mergekit_seed(7, 3, RANDOM_TENSOR), lora_merge_cache=str(root / "lora_cache"),
                           lora_merge_dtype="float32", copy_tokenizer=False, quiet=True, write_model_card=False)
    run_merge(config, str(tmp_path / "mk"), options)
    return _tensors(ours), _tensors(tmp_path / "mk"), text


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each bf16 value (2**-133 for zeros, the smallest subnormal)."""
    exponent = torch.floor(torch.log2(x.float().abs().clamp(min=2.0**-126)))
    return torch.pow(2.0, exponent - 7)


METHODS = list(_OPTIONS)


def engine_base(family, name: str) -> torch.Tensor:
    return family[2].base_tensor(name)


@pytest.mark.parametrize("method", METHODS)
def test_mergekit_run_merge_of_the_exported_yaml_rebuilds_the_export(method: str, family, tmp_path: Path) -> None:
    dtype = family[0]
    ours, theirs, text = _run_both(method, family, tmp_path)
    config = yaml.safe_load(text)
    assert config["dtype"] == "float32" and config.get("out_dtype", "float32") == str(dtype).removeprefix("torch.")
    assert set(ours) == set(theirs)
    assert any(t.numel() > 1 << 18 for t in ours.values())
    for name, mine in ours.items():
        other = theirs[name]
        assert mine.dtype == other.dtype == dtype, name
        if dtype == torch.float32:
            torch.testing.assert_close(mine, other, rtol=2e-6, atol=2e-6 * float(other.abs().max()), msg=name)
        else:
            diff = (mine.float() - other.float()).abs()
            # 1 bf16 ulp of the output, or fp32 rounding of the inputs where the output cancels to ~0
            bound = torch.maximum(_ulp(other), engine_base(family, name).float().abs() * 2.0**-20)
            worst = (diff / bound).max()
            assert worst <= 1, f"{method} {name}: {int((diff > bound).sum())} entries differ, worst by {float(worst)} ulp"


@pytest.mark.parametrize("family", [torch.float32], ids=["fp32"], indirect=True)  # bf16 outputs: within 1 ulp, above
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_ties_family_is_bit_equal_to_mergekit_in_fp32(method: str, family, tmp_path: Path) -> None:
    """TIES adds mergekit's numbers in mergekit's order: the embedding (no LoRA, whose task vector
    mergekit rebuilds from base + B@A and so rounds differently) is equal to the bit, selection,
    election and ties at the boundary included."""
    assert family[0] == torch.float32
    ours, theirs, _ = _run_both(method, family, tmp_path)
    assert torch.equal(ours["model.embed_tokens.weight"], theirs["model.embed_tokens.weight"])
