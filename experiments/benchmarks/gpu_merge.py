"""GPU merge: (merge + swap) per candidate and the merge's bandwidth, Qwen2.5-0.5B shape, 24 layers.

Prepared for a CUDA device (issue 13, item 7; budget <= 8 minutes of device time). It writes a
random-weight model with Qwen2.5-0.5B's published shape (24 layers, hidden 896, GQA 14/2 heads,
q/k/v biases, vocabulary 151,936, tied embeddings, bf16) and experts = base + small noise, loads
them into a `MergeEngine` on the device, and scores per-layer TIES / DARE-TIES candidates with the
transformers scorer, as a search does. Reported, medians over the timed candidates:

* (merge + swap) / candidate time, next to inference (the scorer's own split);
* each method's merge alone and its effective bandwidth: the bytes any in-place merge must move
  (read the base and each expert's task vector once, write the target once: (experts + 2) x model)
  over its time, against the device's copy bandwidth measured here (`dst.copy_(src)` of a large
  buffer: read + write bytes over time), so the fraction says how close the merge is to memory speed.

The one-time costs (checkpoint writing, loading, table building, kernel compiles in `warm_up`, the
first inference) are printed apart and never counted per candidate.

    python -m evomerge.experiments.benchmarks.gpu_merge                             # CUDA, full size
    python -m evomerge.experiments.benchmarks.gpu_merge --size tiny --device cpu     # smoke run, any machine

Calibration prompts come from the toy zoo's skills and the zoo's char-level tokenizer (ids < 64, valid
in any vocabulary): the weights are random, so the scores mean nothing, only the times do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Qwen2Config

from evomerge.experiments.benchmarks.merge_speed import per_layer_recipe
from evomerge.experiments.zoo.skills import SKILLS, sample_unique, skill_rng
from evomerge.experiments.zoo.tokenizer import build_tokenizer
from evomerge.merge import MergeEngine, MergeRecipe
from evomerge.objectives import CalibrationSet, Objective, TransformersScorer

SHAPES: dict[str, dict[str, int]] = {
    # Qwen2.5-0.5B's published config (config.json of Qwen/Qwen2.5-0.5B), all 24 layers: 494M parameters
    "full": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2},
    # the same structure (GQA, biases, tied embeddings) at toy size, for a smoke run on CPU
    "tiny": {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
}


def qwen_config(size: str) -> Qwen2Config:
    """Qwen2.5-0.5B's config at `size` (`SHAPES`), bf16."""
    config = Qwen2Config(**SHAPES[size], max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False)
    config.dtype = "bfloat16"
    return config


def write_checkpoints(folder: Path, size: str, experts: int, device: torch.device, seed: int = 0,
                      ) -> tuple[Path, dict[str, Path]]:
    """Base + `experts` full experts (base + N(0, 0.002) noise), each an HF folder with the zoo
    tokenizer. Names and shapes come from the model class on the meta device (no memory), values are
    drawn on `device` (fast on a GPU) and saved one model at a time."""
    config = qwen_config(size)
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()
                  if n != "lm_head.weight"}  # tied to the embedding: saved once, as HF does
    gen = torch.Generator(device=device).manual_seed(seed)
    base = {n: (torch.randn(s, generator=gen, device=device) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
    tokenizer = build_tokenizer()
    paths: dict[str, Path] = {}
    for k in range(experts + 1):
        name = "base" if k == 0 else f"expert{k}"
        out = folder / name
        out.mkdir(parents=True)
        config.save_pretrained(out)
        tokenizer.save_pretrained(out)
        state = base if k == 0 else {
            n: (t.float() + torch.randn(t.shape, generator=gen, device=device) * 0.002).to(torch.bfloat16)
            for n, t in base.items()}
        save_file({n: t.cpu() for n, t in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
        paths[name] = out
        del state
    return paths.pop("base"), paths


def calibration_objectives(items: int, seed: int = 0) -> list[Objective]:
    """Exact match and answer loss on two zoo skills (`items` prompts each)."""
    objectives = []
    for skill in ("rev", "sort"):
        rows = [{"prompt": e.prompt, "answer": e.answer}
                for e in sample_unique(SKILLS[skill], skill_rng(seed, len(skill)), items)]
        cal = CalibrationSet.from_items(skill, rows)
        objectives += [Objective(f"{skill}_acc", "exact_match", cal), Objective(f"{skill}_loss", "answer_loss", cal)]
    return objectives


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of `fn`, the device's queued work included."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes per second of `dst.copy_(src)` over `nbytes` buffers, reads + writes counted (median)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    seconds = statistics.median(timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * nbytes / seconds


def recipes(experts: Sequence[str], layers: int, n: int) -> list[MergeRecipe]:
    """Per-layer TIES and DARE-TIES candidates, alternating (merge_speed's recipes, one trial each)."""
    return [per_layer_recipe("ties" if i % 2 == 0 else "dare_ties", list(experts), layers, trial=i) for i in range(n)]


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SHAPES), default="full",
                        help="full = Qwen2.5-0.5B's 24 layers; tiny = the same structure at toy size (CPU smoke run)")
    parser.add_argument("--device", default="cuda", help="torch device (cuda, cuda:1, cpu)")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=10, help="timed candidates (after the warm-up)")
    parser.add_argument("--items", type=int, default=16, help="calibration prompts per skill (2 skills)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="fused merge kernels (MergeEngine.load(compile=...)); off = the eager path")
    parser.add_argument("--copy-mb", type=int, default=2048, help="buffer size of the copy-bandwidth reference")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_merge: --device cuda but torch sees no CUDA device; run with --size tiny --device cpu "
                         "for a smoke run, or on a machine with a GPU")
    result: dict[str, float] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_merge_") as tmp:
        base, experts = write_checkpoints(Path(tmp), args.size, args.experts, device)
        result["write_s"] = time.perf_counter() - start
        start = time.perf_counter()
        engine = MergeEngine.load(base, experts, device=device, progress=False,
                                  compile={"auto": "auto", "on": True, "off": False}[args.compile])
        scorer = TransformersScorer(engine, calibration_objectives(args.items), device=device,
                                    batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        result["load_s"] = time.perf_counter() - start
        plan = recipes(engine.expert_names, engine.layout.num_layers, args.candidates + 2)
        result["warm_up_s"] = timed(lambda: engine.warm_up(plan[:2], scorer.model), device)
        first = scorer.evaluate(plan[0])  # first inference: allocator, kernels of the model
        if first.failed:
            raise SystemExit(f"gpu_merge: the warm-up candidate failed: {first.reason}")
        runs = [scorer.evaluate(r) for r in plan[2:]]
        failed = [e.reason for e in runs if e.failed]
        if failed:
            raise SystemExit(f"gpu_merge: a candidate failed: {failed[0]}")
        for key in ("merge", "swap", "inference", "total"):
            result[f"{key}_s"] = statistics.median(e.timings[key] for e in runs)
        result["merge_swap_fraction"] = (result["merge_s"] + result["swap_s"]) / result["total_s"]
        model_bytes = sum(p.numel() * p.element_size() for p in scorer.model.parameters())
        moved = (len(engine.expert_names) + 2) * model_bytes
        result.update(params=engine.num_params, model_gb=model_bytes / 1e9, experts=len(engine.expert_names))
        copy_bw = result["copy_gb_s"] = copy_bandwidth(device, args.copy_mb << 20, 10) / 1e9
        for method in ("ties", "dare_ties"):
            recipe = next(r for r in plan if r.rules[0].method == method)
            seconds = statistics.median(timed(lambda: engine.apply(recipe, scorer.model, stats=False), device)
                                        for _ in range(max(3, args.candidates // 2)))
            result[f"{method}_merge_s"] = seconds
            result[f"{method}_gb_s"] = moved / seconds / 1e9
            result[f"{method}_of_copy"] = result[f"{method}_gb_s"] / copy_bw
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Qwen2.5-0.5B shape ({args.size}): {result['params'] / 1e6:.1f}M params, {result['model_gb']:.3f} GB bf16, "
          f"{result['experts']:.0f} experts, device {name}, fused kernels {'on' if engine.fused else 'off'}")
    print(f"one-time: write checkpoints {result['write_s']:.1f}s, load {result['load_s']:.1f}s, "
          f"warm-up (tables + kernel compiles) {result['warm_up_s']:.1f}s")
    print(f"per candidate ({len(runs)} timed, medians): merge {result['merge_s'] * 1e3:.2f} ms, swap "
          f"{result['swap_s'] * 1e3:.2f} ms, inference {result['inference_s'] * 1e3:.1f} ms, total "
          f"{result['total_s'] * 1e3:.1f} ms; (merge + swap) / candidate = {result['merge_swap_fraction']:.1%}")
    print(f"copy bandwidth (dst.copy_(src), {args.copy_mb} MiB, read + write): {copy_bw:.3g} GB/s")
    for method in ("ties", "dare_ties"):
        print(f"  {method:9s} merge {result[f'{method}_merge_s'] * 1e3:8.2f} ms: {result[f'{method}_gb_s']:.3g} GB/s "
              f"effective ((experts + 2) x model bytes / time) = {result[f'{method}_of_copy']:.1%} of copy bandwidth")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
