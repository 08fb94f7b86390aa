"""The merge benchmark scripts run end to end at toy size on CPU (no timings are asserted: speed is
shown by running them, docs/merge-engine.md). The GPU script is meant for a CUDA device; here it runs
its `--size tiny --device cpu` smoke form, so a device session finds it working."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.experiments.benchmarks import gpu_merge, merge_speed, sort_build


def test_gpu_merge_tiny_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpu.json"
    result = gpu_merge.main(["--size", "tiny", "--device", "cpu", "--candidates", "2", "--items", "2",
                             "--max-new-tokens", "3", "--compile", "off", "--copy-mb", "8", "--json", str(out)])
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(gpu_merge.qwen_config("tiny")).parameters())
    assert result["params"] == params  # every tensor of the Qwen2 structure was written, loaded and merged
    assert result["experts"] == 3
    for key in ("merge_s", "inference_s", "total_s", "ties_merge_s", "dare_ties_merge_s", "copy_gb_s"):
        assert result[key] > 0, key
    assert 0 < result["merge_swap_fraction"] < 1
    assert json.loads(out.read_text()) == pytest.approx(result)
    printed = capsys.readouterr().out
    assert "(merge + swap) / candidate" in printed and "of copy bandwidth" in printed


def test_gpu_merge_full_shape_is_qwen2_5_0_5b() -> None:
    """The full size is Qwen2.5-0.5B's published shape: 494M parameters with tied embeddings."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(gpu_merge.qwen_config("full"))
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    assert model.config.num_hidden_layers == 24 and model.config.tie_word_embeddings


def test_merge_speed_smallest_size(tmp_path: Path) -> None:
    """One size, one round, eager merges (the fused kernels are tested in tests/merge/test_fused.py);
    the plain pass is still the compiled lower bound."""
    out = tmp_path / "speed.json"
    results = merge_speed.main(["--sizes", "1M", "--repeats", "1", "--threads", "1", "--compile", "off",
                                "--json", str(out)])
    r = results["1M"]
    assert 1.0e6 < r["params"] < 1.1e6
    assert r["plain_s"] > 0 and r["ties_ratio"] > 0 and r["dare_ties_cpu_ratio"] > 0
    assert r["peak_rss_over_model"] >= r["budget_over_model"]  # the data alone is (experts + 2) x model
    assert json.loads(out.read_text())["1M"]["params"] == r["params"]


def test_sort_build_smallest_size(tmp_path: Path) -> None:
    """The one-time sorts built one at a time, side by side and mapped from a spill folder give the
    same permutations (the benchmark exits otherwise); the folder is left empty."""
    spill = tmp_path / "sorts"
    r = sort_build.main(["--size", "1M", "--rounds", "1", "--threads", "2", "--methods", "ties,della",
                         "--spill", str(spill)])
    assert r["sorted_entries_m"] > 1 and r["kept_gb"] > 0
    assert r["one_at_a_time_s"] > 0 and r["side_by_side_s"] > 0 and r["side_by_side_mapped_s"] > 0
    assert list(spill.iterdir()) == []
