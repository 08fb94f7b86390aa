"""The toy zoo: layout, loadability (transformers, tokenizer, peft), recomputed figures, determinism."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from evomerge.experiments.zoo import (
    BUILDER_VERSION,
    ZOO_SIZES,
    ZooBuildError,
    accuracy,
    build_zoo,
    exact_match,
    format_accuracy_table,
    load_manifest,
    read_jsonl,
)
from evomerge.experiments.zoo.arithmetic import task_arithmetic
from evomerge.experiments.zoo import is_complete
from evomerge.experiments.zoo.build import BUILD_THREADS
from evomerge.experiments.zoo.cli import zoo as zoo_cli
from evomerge.experiments.zoo.tokenizer import BOS_ID, encode

VARIANTS = {"clean", "near_duplicate", "noise", "small_data"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def build_threads():
    """Recompute figures with the build's thread count (CPU reductions depend on it)."""
    old = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    yield
    torch.set_num_threads(old)


def _load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_dirs(zoo: Path, m: dict) -> list[Path]:
    return [zoo / m["base"]] + [zoo / p for p in m["experts"].values()]


def test_layout_and_manifest(tiny_zoo: Path) -> None:
    m = load_manifest(tiny_zoo)
    assert (m["builder_version"], m["size"], m["seed"], m["arch"]) == (BUILDER_VERSION, "tiny", 0, "llama")
    skills = m["skills"]
    assert len(skills) >= 3 and set(m["experts"]) == set(skills)
    assert m["base"] == "base" and m["lora_experts"]
    for d in _hf_dirs(tiny_zoo, m):
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (d / f).is_file(), d / f
    for rel in list(m["lora_experts"].values()) + [e["path"] for e in m["pool"]]:
        assert (tiny_zoo / rel / "adapter_config.json").is_file()
        assert (tiny_zoo / rel / "adapter_model.safetensors").is_file()
    assert len(m["pool"]) >= 12
    assert {e["variant"] for e in m["pool"]} == VARIANTS
    assert len({e["name"] for e in m["pool"]}) == len(m["pool"])
    names = ["base", *(f"expert:{s}" for s in skills), *(f"lora:{s}" for s in m["lora_experts"]),
             "task_arithmetic:uniform", "task_arithmetic:sum", *(f"pool:{e['name']}" for e in m["pool"])]
    for n in names:
        assert set(m["accuracy"][n]) == set(skills), n
        assert all(0.0 <= v <= 1.0 for v in m["accuracy"][n].values())
    for n in ["base", *(f"expert:{s}" for s in skills)]:
        t = m["training"][n]
        assert t["steps"] > 0 and t["seconds"] > 0 and t["final_loss"] < t["first_loss"], n
    assert m["build_seconds"] > 0
    table = format_accuracy_table(m)
    assert all(n in table for n in names) and all(s in table for s in skills)


def test_data_splits(tiny_zoo: Path) -> None:
    m = load_manifest(tiny_zoo)
    spec = ZOO_SIZES["tiny"]
    for s, paths in m["data"].items():
        for split, n in (("calib", spec.n_calib), ("test", spec.n_test)):
            lines = (tiny_zoo / paths[split]).read_text().splitlines()
            assert len(lines) == n
            rows = [json.loads(line) for line in lines]
            assert all(set(r) == {"prompt", "answer"} and r["prompt"].endswith("=") for r in rows)
            assert all(r["prompt"].split(" ")[0] == s and r["answer"] for r in rows)
        calib = {e.prompt for e in read_jsonl(tiny_zoo / paths["calib"])}
        test = {e.prompt for e in read_jsonl(tiny_zoo / paths["test"])}
        assert not calib & test and len(test) == spec.n_test
    rev = read_jsonl(tiny_zoo / m["data"]["rev"]["test"])
    assert all(e.answer == e.prompt[4:-1][::-1] for e in rev)


def test_exact_match_semantics() -> None:
    assert exact_match("dcba", "dcba")
    assert exact_match(" dcba \nrev xyz=zyx", "dcba")
    assert not exact_match("dcb", "dcba")
    assert not exact_match("dcbaa", "dcba")


def test_models_and_tokenizer_load_offline(tiny_zoo: Path) -> None:
    from transformers import AutoTokenizer

    m = load_manifest(tiny_zoo)
    base_sd = None
    for d in _hf_dirs(tiny_zoo, m):
        model = _load_model(d)
        cfg = model.config
        assert type(model).__name__ == "LlamaForCausalLM"
        assert cfg.hidden_size // cfg.num_attention_heads >= 32
        assert cfg.tie_word_embeddings is False and cfg.max_position_embeddings <= 512
        sd = {k: v for k, v in load_file(d / "model.safetensors").items()}
        assert all(v.dtype == torch.float32 for v in sd.values())
        assert "lm_head.weight" in sd
        if base_sd is None:
            base_sd = sd
        else:  # an expert really differs from the base, but stays in its basin
            diff = sum(float((sd[k] - base_sd[k]).norm()) for k in sd)
            assert 0 < diff < sum(float(v.norm()) for v in base_sd.values())
    tok = AutoTokenizer.from_pretrained(tiny_zoo / "base")
    assert tok.bos_token and tok.eos_token and tok.pad_token and tok.padding_side == "left"
    prompt = read_jsonl(tiny_zoo / m["data"][m["skills"][0]]["test"])[0].prompt
    assert tok(prompt).input_ids == [BOS_ID] + encode(prompt)
    assert tok.decode(tok(prompt).input_ids, skip_special_tokens=True) == prompt


def test_adapters_load_with_peft(tiny_zoo: Path) -> None:
    from peft import PeftModel

    m = load_manifest(tiny_zoo)
    rels = list(m["lora_experts"].values()) + [m["pool"][0]["path"], m["pool"][-1]["path"]]
    for rel in rels:
        cfg = json.loads((tiny_zoo / rel / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] >= 1
        weights = load_file(tiny_zoo / rel / "adapter_model.safetensors")
        lora_b = [v for k, v in weights.items() if "lora_B" in k]
        assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)  # actually trained
        model = PeftModel.from_pretrained(_load_model(tiny_zoo / "base"), tiny_zoo / rel)
        assert any("lora_A" in n for n, _ in model.named_parameters())


def test_manifest_figures_recompute(tiny_zoo: Path, build_threads) -> None:
    """Accuracy of base, an expert, a LoRA expert, a pool adapter and uniform TA, from the files on disk."""
    from peft import PeftModel

    m = load_manifest(tiny_zoo)
    skills = m["skills"]
    tests = {s: read_jsonl(tiny_zoo / m["data"][s]["test"]) for s in skills}
    acc = m["accuracy"]

    def check(name: str, model) -> None:
        got = {s: accuracy(model, tests[s]) for s in skills}
        assert got == pytest.approx(acc[name], abs=1e-9), name

    base = _load_model(tiny_zoo / "base")
    check("base", base)
    s0 = skills[0]
    check(f"expert:{s0}", _load_model(tiny_zoo / m["experts"][s0]))
    lora_skill, lora_rel = next(iter(m["lora_experts"].items()))
    check(f"lora:{lora_skill}", PeftModel.from_pretrained(_load_model(tiny_zoo / "base"), tiny_zoo / lora_rel))
    entry = m["pool"][0]
    check(f"pool:{entry['name']}", PeftModel.from_pretrained(_load_model(tiny_zoo / "base"), tiny_zoo / entry["path"]))
    base_sd = base.state_dict()
    experts = [_load_model(tiny_zoo / m["experts"][s]).state_dict() for s in skills]
    merged = _load_model(tiny_zoo / "base")
    merged.load_state_dict(task_arithmetic(base_sd, experts, m["merges"]["task_arithmetic:uniform"]["weight"]))
    check("task_arithmetic:uniform", merged)


def test_tiny_experts_beat_base(tiny_zoo: Path) -> None:
    m = load_manifest(tiny_zoo)
    acc = m["accuracy"]
    for s in m["skills"]:
        assert acc[f"expert:{s}"][s] > acc["base"][s], s
    for s in m["lora_experts"]:
        assert acc[f"lora:{s}"][s] > acc["base"][s], s


def test_cached_call_returns_at_once(tiny_zoo: Path) -> None:
    t = time.perf_counter()
    assert build_zoo("tiny", seed=0, arch="llama", progress=False) == tiny_zoo
    assert build_zoo("tiny", out=tiny_zoo, progress=False) == tiny_zoo
    assert time.perf_counter() - t < 2.0


def test_incomplete_dir_is_not_a_zoo(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    key = {"builder_version": BUILDER_VERSION, "size": "tiny", "seed": 0, "arch": "llama", "tie_word_embeddings": False}
    assert not is_complete(tmp_path, key)
    (tmp_path / "manifest.json").write_text(json.dumps({**key, "seed": 1}))
    assert not is_complete(tmp_path, key)


def test_build_is_deterministic(tiny_zoo: Path, tmp_path: Path) -> None:
    """Same seed, same machine: bit-identical weights, adapters and data."""
    m = load_manifest(tiny_zoo)
    ref = tiny_zoo
    if m.get("build_threads") != BUILD_THREADS:  # cached zoo built under another thread override
        ref = build_zoo("tiny", out=tmp_path / "a", force=True, progress=False)
    again = build_zoo("tiny", out=tmp_path / "b", force=True, progress=False)
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.suffix in (".safetensors", ".jsonl"))
    assert len(files) >= 1 + len(m["skills"]) + 12
    for rel in files:
        assert (ref / rel).read_bytes() == (again / rel).read_bytes(), rel
    assert load_manifest(again)["accuracy"] == m["accuracy"]
    other = {k: v for k, v in load_file(ref / "base" / "model.safetensors").items()}
    assert not list(tmp_path.glob(".*building*"))  # the temp dir was renamed into place
    assert other  # weights exist


@pytest.mark.parametrize("arch,tied,cls", [("qwen2", True, "Qwen2ForCausalLM"), ("mistral", False, "MistralForCausalLM")])
def test_arch_variants_build_and_load(tmp_path: Path, arch: str, tied: bool, cls: str) -> None:
    from peft import PeftModel

    zoo = build_zoo("tiny", arch=arch, out=tmp_path / arch, progress=False, tie_word_embeddings=tied)
    m = load_manifest(zoo)
    assert m["arch"] == arch and m["tie_word_embeddings"] is tied
    base = _load_model(zoo / "base")
    assert type(base).__name__ == cls and base.config.tie_word_embeddings is tied
    if tied:
        assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
        assert "lm_head.weight" not in load_file(zoo / "base" / "model.safetensors")
    if arch == "qwen2":
        assert base.model.layers[0].self_attn.q_proj.bias is not None
    expert = _load_model(zoo / m["experts"][m["skills"][0]])
    assert type(expert).__name__ == cls
    PeftModel.from_pretrained(base, zoo / m["pool"][0]["path"])
    s = m["skills"][0]
    assert m["accuracy"][f"expert:{s}"][s] > m["accuracy"]["base"][s]


def test_cli_build_cached_and_bad_out(tiny_zoo: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(zoo_cli, ["build", "--size", "tiny", "--out", str(tiny_zoo), "--quiet"])
    assert res.exit_code == 0, res.output
    assert str(tiny_zoo) in res.output and "expert:" in res.output and "task_arithmetic:uniform" in res.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = runner.invoke(zoo_cli, ["build", "--size", "tiny", "--out", str(blocker / "zoo"), "--quiet"])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "error" in res.output


def test_bad_arguments() -> None:
    with pytest.raises(ZooBuildError):
        build_zoo("huge")
    with pytest.raises(ZooBuildError):
        build_zoo("tiny", arch="gpt2")
