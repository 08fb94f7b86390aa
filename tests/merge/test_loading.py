"""Loading: single/sharded safetensors, bf16, pickle opt-in, tied embeddings, compatibility errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evomerge.merge import CheckpointReader, ExpertParams, GroupRule, MergeEngine, MergeError, MergeRecipe

from .conftest import save_model, tiny_config

AVERAGE = MergeRecipe(rules=[GroupRule(method="task_arithmetic", experts={"a": ExpertParams(weight=0.5), "b": ExpertParams(weight=0.5)})])


def test_sharded_and_single_checkpoints_read_the_same_way(llama_family: dict[str, Path]) -> None:
    sharded = CheckpointReader(llama_family["b"])
    assert (llama_family["b"] / "model.safetensors.index.json").is_file()
    reference = AutoModelForCausalLM.from_pretrained(llama_family["b"]).state_dict()
    assert set(sharded.names()) == set(reference)
    for name in sharded.names():
        assert sharded.shape(name) == tuple(reference[name].shape)
        assert torch.equal(sharded.get(name), reference[name])


def test_task_vectors_are_expert_minus_base(llama_family: dict[str, Path]) -> None:
    engine = MergeEngine.load(llama_family["base"], {"a": llama_family["a"], "b": llama_family["b"]}, progress=False)
    base = load_file(llama_family["base"] / "model.safetensors")
    expert = load_file(llama_family["a"] / "model.safetensors")
    merged = engine.merged_state(AVERAGE)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(engine._delta("a", name), expert[name] - base[name])
    assert merged[name].dtype == torch.float32 and not torch.equal(merged[name], base[name])


def test_bf16_checkpoints_merge_with_fp32_deltas(tmp_path: Path) -> None:
    config = tiny_config("qwen2")
    base = save_model(tmp_path / "base", config, 0, dtype=torch.bfloat16)
    a = save_model(tmp_path / "a", config, 1, dtype=torch.bfloat16, noise_of=base)
    b = save_model(tmp_path / "b", config, 2, dtype=torch.bfloat16, noise_of=base)
    engine = MergeEngine.load(base, {"a": a, "b": b}, progress=False)
    assert engine.dtype == torch.bfloat16
    target = engine.new_target_model()
    assert next(target.parameters()).dtype == torch.bfloat16
    engine.apply(AVERAGE, target)
    bs, as_, bs_ = (load_file(p / "model.safetensors") for p in (base, a, b))
    name = "model.layers.0.self_attn.k_proj.bias"
    expected = (bs[name].float() + 0.5 * (as_[name].float() - bs[name].float()) + 0.5 * (bs_[name].float() - bs[name].float()))
    got = dict(target.named_parameters())[name]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


def test_bf16_task_vectors_are_the_fp32_difference_rounded_once(tmp_path: Path) -> None:
    """Expert tensors are read into one reused staging buffer and subtracted with one `torch.sub`:
    every task vector must still be `(expert - base)` computed in fp32 and rounded once to bf16, and
    no tensor may alias the buffer (a later read would overwrite it)."""
    config = tiny_config("llama")
    base = save_model(tmp_path / "base", config, 0, dtype=torch.bfloat16)
    a = save_model(tmp_path / "a", config, 1, dtype=torch.bfloat16, noise_of=base)
    b = save_model(tmp_path / "b", config, 2, dtype=torch.bfloat16, noise_of=base)
    engine = MergeEngine.load(base, {"a": a, "b": b}, progress=False)
    bs = load_file(base / "model.safetensors")
    for expert, folder in (("a", a), ("b", b)):
        es = load_file(folder / "model.safetensors")
        for name in engine.layout.slots:
            expected = (es[name].float() - bs[name].float()).to(torch.bfloat16)
            assert torch.equal(engine._delta(expert, name).view(torch.int16), expected.view(torch.int16)), (expert, name)


def test_pickle_needs_explicit_opt_in(tmp_path: Path, llama_family: dict[str, Path]) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((llama_family["a"] / "config.json").read_text())
    state = load_file(llama_family["a"] / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(MergeError, match=r"pickle checkpoints.*allow_pickle=True"):
        MergeEngine.load(llama_family["base"], {"a": folder}, progress=False)
    engine = MergeEngine.load(llama_family["base"], {"a": folder}, allow_pickle=True, progress=False)
    reader = CheckpointReader(folder, allow_pickle=True)
    assert all(torch.equal(reader.get(n), state[n]) for n in state)
    assert engine.expert_names == ["a"]


def test_tied_embeddings_are_merged_once(tmp_path: Path) -> None:
    config = tiny_config("gemma", tie_word_embeddings=True)
    base = save_model(tmp_path / "base", config, 0)
    a = save_model(tmp_path / "a", config, 1, noise_of=base)
    engine = MergeEngine.load(base, {"a": a}, progress=False)
    assert "lm_head.weight" not in engine.layout.slots
    target = engine.new_target_model()
    recipe = MergeRecipe(rules=[GroupRule(method="task_arithmetic", experts={"a": ExpertParams(weight=1.0)})], normalize=False)
    engine.apply(recipe, target)
    expert = load_file(a / "model.safetensors")
    assert target.lm_head.weight.data_ptr() == target.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(target.model.embed_tokens.weight, expert["model.embed_tokens.weight"], atol=1e-6, rtol=0)


def test_missing_folders_and_architecture_mismatch_name_the_culprit(tmp_path: Path, llama_family: dict[str, Path]) -> None:
    with pytest.raises(MergeError, match=r"expert 'x' folder .*nowhere does not exist"):
        MergeEngine.load(llama_family["base"], {"x": tmp_path / "nowhere"}, progress=False)
    with pytest.raises(MergeError, match="base model folder"):
        MergeEngine.load(tmp_path / "nobase", {"a": llama_family["a"]}, progress=False)
    qwen = save_model(tmp_path / "qwen", tiny_config("qwen2"), 0)
    with pytest.raises(MergeError, match=r"expert 'q' .*model_type 'qwen2' differs from the base's 'llama'"):
        MergeEngine.load(llama_family["base"], {"q": qwen}, progress=False)


def test_shape_mismatch_names_model_tensor_and_both_shapes(tmp_path: Path, llama_family: dict[str, Path]) -> None:
    wide = save_model(tmp_path / "wide", tiny_config("llama", intermediate_size=80), 0)
    with pytest.raises(MergeError, match=r"shape mismatch: expert 'w' .* tensor model\.layers\.0\.mlp\.down_proj\.weight has shape \(32, 80\), base has \(32, 64\)"):
        MergeEngine.load(llama_family["base"], {"w": wide}, progress=False)


def test_vocabulary_mismatch_errors_unless_truncate_policy(tmp_path: Path, llama_family: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_family["a"])
    model.resize_token_embeddings(100)
    big = tmp_path / "bigvocab"
    model.save_pretrained(big)
    with pytest.raises(MergeError, match=r"expert 'v' .*(lm_head|model\.embed_tokens)\.weight has shape \(100, 32\), base has \(96, 32\).*vocab_policy='truncate'"):
        MergeEngine.load(llama_family["base"], {"v": big}, progress=False)
    engine = MergeEngine.load(llama_family["base"], {"v": big}, vocab_policy="truncate", progress=False)
    recipe = MergeRecipe(rules=[GroupRule(method="task_arithmetic", experts={"v": ExpertParams(weight=1.0)})], normalize=False)
    merged = engine.merged_state(recipe)
    expert = load_file(big / "model.safetensors")
    torch.testing.assert_close(merged["model.embed_tokens.weight"], expert["model.embed_tokens.weight"][:96], atol=1e-6, rtol=0)
    with pytest.raises(MergeError, match="vocab_policy 'pad' is unknown"):
        MergeEngine.load(llama_family["base"], {"v": big}, vocab_policy="pad", progress=False)  # type: ignore[arg-type]
