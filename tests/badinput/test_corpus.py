"""The bad-input corpus: every case runs the real CLI in a subprocess, as a new user would, and
must exit with status 2 after exactly one stderr line that names the culprit, leaving every file
and folder (its own folder and the shared zoo) exactly as it was.

Classes covered: spec file and YAML, every spec section's fields (names, seeds, bounds, numbers
that are not finite, unknown keys and values), --set and --preset, storage URLs and paths,
optimizers and their options, model folders (config.json against the weights, safetensors and
pickle files, architectures, remote code), calibration files, run folders (new, foreign,
damaged state/spec/ledger), and the inspection commands (resume, export, report, front, status,
batch). Cases run three at a time (each is a process start of seconds on a loaded machine).
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from .conftest import World, evomerge, snapshot

pytestmark = pytest.mark.slow

Setup = Callable[[Path, World], list[str]]


@dataclass(frozen=True)
class Case:
    id: str
    setup: Setup
    culprit: str
    """Text the one stderr line must contain (the field, file or option at fault)."""
    usage: bool = False
    """A click argument error: its usual usage form (a few lines ending in "Error: ...") is accepted."""
    extra: tuple[str, ...] = field(default=())
    """Paths (relative to the case folder) that must still not exist afterwards (e.g. a payload's marker)."""


CASES: list[Case] = []


def case(culprit: str, *, usage: bool = False, extra: tuple[str, ...] = ()) -> Callable[[Setup], Setup]:
    def register(fn: Setup) -> Setup:
        CASES.append(Case(fn.__name__, fn, culprit, usage, extra))
        return fn

    return register


# ----------------------------------------------------------------------------------------- helpers


def _write_spec(d: Path, data: object, name: str = "spec.yaml") -> str:
    (d / name).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return name


def _run(d: Path, w: World, edit: Callable[[dict], None]) -> list[str]:
    spec = copy.deepcopy(w.spec())
    edit(spec)
    return ["run", _write_spec(d, spec), "--quiet"]


def _expert(d: Path, w: World, damage: Callable[[Path], None], *, allow_pickle: bool = False) -> list[str]:
    """A run whose expert 'rev' is a damaged copy of the zoo's."""
    folder = Path(shutil.copytree(w.zoo / "experts" / "rev", d / "expert"))
    damage(folder)

    def edit(s: dict) -> None:
        s["models"]["experts"]["rev"] = str(folder)
        if allow_pickle:
            s["models"]["allow_pickle"] = True

    return _run(d, w, edit)


def _base(d: Path, w: World, damage: Callable[[Path], None]) -> list[str]:
    folder = Path(shutil.copytree(w.zoo / "base", d / "base"))
    damage(folder)
    return _run(d, w, lambda s: s["models"].__setitem__("base", str(folder)))


def _config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _calib(d: Path, w: World, content: bytes) -> list[str]:
    (d / "calib.jsonl").write_bytes(content)
    return _run(d, w, lambda s: s["objectives"][0].__setitem__("data", str(d / "calib.jsonl")))


def _copy_run(d: Path, w: World) -> Path:
    return Path(shutil.copytree(w.good_run, d / "run"))


def _edit_run_spec(run: Path, edit: Callable[[dict], None]) -> None:
    data = yaml.safe_load((run / "spec.yaml").read_text())
    edit(data)
    (run / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


class _Payload:
    """Unpickling it creates the folder ``marker``: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.makedirs, (str(self.marker),))


# ------------------------------------------------------------------------------------ the spec file


@case("missing.yaml")
def spec_file_missing(d, w):
    return ["run", "missing.yaml"]


@case("spec.yaml", usage=True)
def spec_is_a_folder(d, w):
    (d / "spec.yaml").mkdir()
    return ["run", "spec.yaml"]


@case("invalid YAML")
def yaml_syntax(d, w):
    (d / "spec.yaml").write_text("name: x\nmodels: [unclosed\n")
    return ["run", "spec.yaml"]


@case("not UTF-8")
def spec_not_utf8(d, w):
    (d / "spec.yaml").write_bytes(b"name: caf\xe9\n")
    return ["run", "spec.yaml"]


@case("expected a mapping")
def spec_is_a_list(d, w):
    (d / "spec.yaml").write_text("- a\n- b\n")
    return ["run", "spec.yaml"]


@case("duplicate key")
def spec_duplicate_key(d, w):
    (d / "spec.yaml").write_text(yaml.safe_dump(w.spec()) + "name: again\n")
    return ["run", "spec.yaml"]


@case("spec.yaml")
def spec_empty_file(d, w):
    (d / "spec.yaml").write_text("")
    return ["run", "spec.yaml"]


@case("--preset")
def preset_unknown(d, w):
    return ["run", "--preset", "no-such-preset"]


@case("SPEC file or --preset")
def spec_and_preset(d, w):
    _write_spec(d, w.spec())
    return ["run", "spec.yaml", "--preset", "demo"]


# ------------------------------------------------------------------------------------- spec fields


@case("nmae")
def unknown_top_key(d, w):
    return _run(d, w, lambda s: s.__setitem__("nmae", "x"))


@case("models.bse")
def unknown_nested_key(d, w):
    return _run(d, w, lambda s: s["models"].__setitem__("bse", "x"))


@case("name")
def name_missing(d, w):
    return _run(d, w, lambda s: s.pop("name"))


@case("name")
def name_with_space(d, w):
    return _run(d, w, lambda s: s.__setitem__("name", "a b"))


@case("seed")
def seed_negative(d, w):
    return _run(d, w, lambda s: s.__setitem__("seed", -1))


@case("seed")
def seed_above_32_bits(d, w):
    return _run(d, w, lambda s: s.__setitem__("seed", 2**32))


@case("seed")
def seed_not_a_number(d, w):
    return _run(d, w, lambda s: s.__setitem__("seed", "abc"))


@case("data_seed")
def data_seed_negative(d, w):
    return _run(d, w, lambda s: s.__setitem__("data_seed", -3))


@case("fidelity.rungs")
def fidelity_rungs_not_increasing(d, w):
    return _run(d, w, lambda s: s.__setitem__("fidelity", {"rungs": [8, 4], "eta": 3}))


@case("seed")
def seed_fractional(d, w):
    return _run(d, w, lambda s: s.__setitem__("seed", 1.5))


@case("models.base")
def base_path_missing(d, w):
    return _run(d, w, lambda s: s["models"].__setitem__("base", str(d / "nowhere")))


@case("models.experts")
def expert_path_missing(d, w):
    return _run(d, w, lambda s: s["models"]["experts"].__setitem__("rev", str(d / "nowhere")))


@case("models")
def models_without_experts(d, w):
    return _run(d, w, lambda s: s["models"].__setitem__("experts", {}))


@case("trust_remote_code")
def trust_remote_code_true(d, w):
    return _run(d, w, lambda s: s["models"].__setitem__("trust_remote_code", True))


@case("space.bounds.weight")
def bounds_nan(d, w):
    return _run(d, w, lambda s: s["space"].__setitem__("bounds", {"weight": [float("nan"), 1.0]}))


@case("space.bounds.weight")
def bounds_infinite(d, w):
    return _run(d, w, lambda s: s["space"].__setitem__("bounds", {"weight": [0.0, float("inf")]}))


@case("bounds for 'weight'")
def bounds_absurd(d, w):
    return _run(d, w, lambda s: s["space"].__setitem__("bounds", {"weight": [0.0, 1e300]}))


@case("bounds for 'weight'")
def bounds_reversed(d, w):
    return _run(d, w, lambda s: s["space"].__setitem__("bounds", {"weight": [1.0, 0.0]}))


@case("bounds for 'density'")
def bounds_outside_legal_range(d, w):
    return _run(d, w, lambda s: s["space"].__setitem__("bounds", {"density": [0.0, 2.0]}))


@case("space.bounds")
def bounds_one_number(d, w):
    return _run(d, w, lambda s: s["space"].__setitem__("bounds", {"weight": [1.0]}))


@case("space.init.weight")
def init_nan(d, w):
    return _run(d, w, lambda s: s["space"].__setitem__("init", {"weight": float("nan")}))


@case("init for 'weight'")
def init_outside_bounds(d, w):
    return _run(d, w, lambda s: s["space"].__setitem__("init", {"weight": 7.0}))


@case("space.fixed")
def fixed_infinite(d, w):
    return _run(d, w, lambda s: s["space"].__setitem__("fixed", {"density": float("inf")}))


@case("space.lambda")
def lambda_nan(d, w):
    return _run(d, w, lambda s: s["space"].__setitem__("lambda", float("nan")))


@case("space.method")
def method_unknown(d, w):
    return _run(d, w, lambda s: s["space"].__setitem__("method", "tie"))


@case("space.params")
def param_kind_unknown(d, w):
    return _run(d, w, lambda s: s["space"].__setitem__("params", ["weight", "densty"]))


@case("space.granularity")
def granularity_zero(d, w):
    return _run(d, w, lambda s: s["space"].__setitem__("granularity", 0))


@case("objectives[0].metric")
def metric_unknown(d, w):
    return _run(d, w, lambda s: s["objectives"][0].__setitem__("metric", "acuracy"))


@case("'data'")
def metric_without_data(d, w):
    return _run(d, w, lambda s: s["objectives"][0].pop("data"))


@case("objectives[0].size")
def objective_size_zero(d, w):
    return _run(d, w, lambda s: s["objectives"][0].__setitem__("size", 0))


@case("unique")
def objective_names_repeated(d, w):
    return _run(d, w, lambda s: s["objectives"][1].__setitem__("name", "rev"))


@case("objectives")
def objectives_empty(d, w):
    return _run(d, w, lambda s: s.__setitem__("objectives", []))


@case("constraint")
def constraint_on_unknown_objective(d, w):
    return _run(d, w, lambda s: s.__setitem__("constraints", [{"objective": "nope", "max": 1.0}]))


@case("scorer.device")
def device_unknown(d, w):
    return _run(d, w, lambda s: s["scorer"].__setitem__("device", "gpu"))


@case("scorer.batch_size")
def batch_size_zero(d, w):
    return _run(d, w, lambda s: s["scorer"].__setitem__("batch_size", 0))


@case("scorer.timeout")
def timeout_infinite(d, w):
    return _run(d, w, lambda s: s["scorer"].__setitem__("timeout", float("inf")))


@case("optimizer.name")
def optimizer_unknown(d, w):
    return _run(d, w, lambda s: s["optimizer"].__setitem__("name", "CMAA"))


@case("optimizer.name")
def optimizer_self_selecting(d, w):
    return _run(d, w, lambda s: s["optimizer"].__setitem__("name", "NGOpt"))


@case("space.methods: nevergrad:CMA searches floats only")
def method_choice_with_a_float_optimizer(d, w):
    return _run(d, w, lambda s: s["space"].__setitem__("methods", ["task_arithmetic", "ties"]))


@case("optimizer.library")
def optimizer_library_unknown(d, w):
    return _run(d, w, lambda s: s["optimizer"].__setitem__("library", "hyperopt"))


@case("optimizer.options")
def optuna_option_unknown(d, w):
    return _run(d, w, lambda s: s.__setitem__("optimizer", {"library": "optuna", "name": "nsga2", "options": {"popsize": 4}}))


@case("optimizer.options")
def optuna_option_bad_value(d, w):
    return _run(d, w, lambda s: s.__setitem__("optimizer", {"library": "optuna", "name": "nsga2", "options": {"population_size": 1}}))


@case("optimizer.options")
def nevergrad_option_unknown(d, w):
    return _run(d, w, lambda s: s["optimizer"].__setitem__("options", {"popsize": 4}))


@case("stages[1].optimizer.options")
def stage_option_unknown(d, w):
    def edit(s):
        s["stages"] = [{"name": "one"}, {"name": "two", "optimizer": {"library": "optuna", "name": "tpe", "options": {"bogus": 1}}}]

    return _run(d, w, edit)


@case("optimizer.l1_penalty")
def l1_penalty_nan(d, w):
    return _run(d, w, lambda s: s["optimizer"].__setitem__("l1_penalty", float("nan")))


@case("optimizer.weights")
def weights_unknown_objective(d, w):
    return _run(d, w, lambda s: s["optimizer"].__setitem__("weights", {"nope": 1.0}))


@case("budget")
def budget_missing(d, w):
    return _run(d, w, lambda s: s.pop("budget"))


@case("budget.evaluations")
def budget_zero(d, w):
    return _run(d, w, lambda s: s["budget"].__setitem__("evaluations", 0))


@case("budget.wall_clock")
def wall_clock_garbage(d, w):
    return _run(d, w, lambda s: s["budget"].__setitem__("wall_clock", "ten minutes"))


@case("budget.wall_clock")
def wall_clock_infinite(d, w):
    return _run(d, w, lambda s: s["budget"].__setitem__("wall_clock", float("inf")))


@case("stages")
def stages_empty(d, w):
    return _run(d, w, lambda s: s.__setitem__("stages", []))


@case("models.allow_pickle")
def boolean_written_as_text(d, w):
    return _run(d, w, lambda s: s["models"].__setitem__("allow_pickle", "yes"))


@case("objectives")
def only_cost_objectives(d, w):
    return _run(d, w, lambda s: s.__setitem__("objectives", [{"name": "kept", "metric": "kept_fraction"}]))


@case("fixed")
def fixed_weight_absurd(d, w):
    return _run(d, w, lambda s: s["space"].__setitem__("fixed", {"weight": 2000}))


@case("bounds")
def bounds_for_a_kind_no_method_reads(d, w):
    def edit(s: dict) -> None:
        s["space"].update(method="task_arithmetic", params=["weight"], bounds={"density": [0.1, 0.9]})

    return _run(d, w, edit)


@case("init")
def init_by_name_outside_bounds(d, w):
    return _run(d, w, lambda s: s["space"].__setitem__("init", {"L0.density[rev]": 1.5}))


@case("models.experts.rev")
def expert_path_is_a_symlink_loop(d, w):
    (d / "loop").symlink_to(d / "loop")
    return _run(d, w, lambda s: s["models"]["experts"].__setitem__("rev", str(d / "loop")))


@case("models.experts")
def expert_named_like_a_pool_adapter(d, w):
    def edit(s: dict) -> None:
        s["models"]["pool"] = str(w.zoo / "pool")
        s["models"]["experts"]["rev-clean0"] = s["models"]["experts"].pop("rev")
        s["space"].update(method="task_arithmetic", params=["weight"])

    return _run(d, w, edit)


@case("scorer.backend")
def vllm_backend_without_a_usable_vllm(d, w):
    # vLLM is absent from the test environment (and has no GPU where it is present on CPU)
    return _run(d, w, lambda s: s["scorer"].__setitem__("backend", "vllm"))


@case("objectives[0].function")
def custom_metric_not_importable(d, w):
    def edit(s: dict) -> None:
        s["objectives"][0].update(metric="custom", function="no_such_module_here:score")

    return _run(d, w, edit)


# --------------------------------------------------------------------------------------- --set


@case("--set")
def set_without_equals(d, w):
    return ["run", _write_spec(d, w.spec()), "--set", "budget.evaluations"]


@case("--set budget.evaluations")
def set_value_bad_yaml(d, w):
    return ["run", _write_spec(d, w.spec()), "--set", "budget.evaluations=[1,"]


@case("--set name.x")
def set_into_a_value(d, w):
    return ["run", _write_spec(d, w.spec()), "--set", "name.x=1"]


@case("--set")
def set_empty_key(d, w):
    return ["run", _write_spec(d, w.spec()), "--set", "budget..evaluations=3"]


@case("budget.evaluations")
def set_bad_value(d, w):
    return ["run", _write_spec(d, w.spec()), "--set", "budget.evaluations=-3"]


# ----------------------------------------------------------------------------------------- storage


@case("storage")
def storage_unknown_scheme(d, w):
    return _run(d, w, lambda s: s.__setitem__("storage", "foo://bar/baz"))


@case("storage")
def storage_unreachable_postgres(d, w):
    return _run(d, w, lambda s: s.__setitem__("storage", "postgresql+psycopg2://user:secret@127.0.0.1:1/db"))


@case("storage")
def storage_driver_missing(d, w):
    return _run(d, w, lambda s: s.__setitem__("storage", "mysql+mysqldb://user@127.0.0.1/db"))


@case("storage")
def storage_sqlite_under_a_file(d, w):
    (d / "afile").write_text("x")
    return _run(d, w, lambda s: s.__setitem__("storage", f"sqlite:///{d / 'afile' / 'ledger.db'}"))


@case("not an SQLite database")
def storage_sqlite_not_sqlite(d, w):
    (d / "junk.db").write_text("not a database")
    return _run(d, w, lambda s: s.__setitem__("storage", f"sqlite:///{d / 'junk.db'}"))


@case("storage")
def storage_journal_not_a_journal(d, w):
    (d / "ledger.log").write_bytes(b"\x00\xff garbage")
    return _run(d, w, lambda s: s.__setitem__("storage", str(d / "ledger.log")))


@case("storage")
def storage_not_a_url(d, w):
    return _run(d, w, lambda s: s.__setitem__("storage", "postgresql://:::bad"))


# ---------------------------------------------------------------------------------------- models


@case("num_hidden_layers")
def config_layers_disagree(d, w):
    return _expert(d, w, lambda f: _config(f, num_hidden_layers=6))


@case("hidden_size")
def config_hidden_disagrees(d, w):
    return _expert(d, w, lambda f: _config(f, hidden_size=128))


@case("vocab_size")
def config_vocab_disagrees(d, w):
    return _expert(d, w, lambda f: _config(f, vocab_size=99))


@case("num_hidden_layers")
def base_config_layers_disagree(d, w):
    return _base(d, w, lambda f: _config(f, num_hidden_layers=1))


@case("config.json")
def config_not_json(d, w):
    return _expert(d, w, lambda f: (f / "config.json").write_text("{not json"))


@case("config.json")
def config_not_utf8(d, w):
    return _expert(d, w, lambda f: (f / "config.json").write_bytes(b'{"model_type": "llam\xe1"}'))


@case("config.json")
def config_is_a_list(d, w):
    return _expert(d, w, lambda f: (f / "config.json").write_text("[1, 2]"))


@case("config.json")
def config_missing(d, w):
    return _expert(d, w, lambda f: (f / "config.json").unlink())


@case("model_type")
def architecture_differs(d, w):
    return _expert(d, w, lambda f: _config(f, model_type="mistral", architectures=["MistralForCausalLM"]))


@case("model_type")
def base_architecture_unknown(d, w):
    return _base(d, w, lambda f: _config(f, model_type="my_custom", auto_map={"AutoModelForCausalLM": "modeling.Mine"}))


@case("model.safetensors")
def safetensors_truncated(d, w):
    def damage(f: Path) -> None:
        data = (f / "model.safetensors").read_bytes()
        (f / "model.safetensors").write_bytes(data[: len(data) // 2])

    return _expert(d, w, damage)


@case("model.safetensors")
def safetensors_header_corrupt(d, w):
    def damage(f: Path) -> None:
        data = bytearray((f / "model.safetensors").read_bytes())
        data[8:40] = b"#" * 32
        (f / "model.safetensors").write_bytes(bytes(data))

    return _expert(d, w, damage)


@case("model.safetensors")
def safetensors_header_length_absurd(d, w):
    def damage(f: Path) -> None:
        data = (f / "model.safetensors").read_bytes()
        (f / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + data[8:])

    return _expert(d, w, damage)


@case("model.safetensors")
def safetensors_empty(d, w):
    return _expert(d, w, lambda f: (f / "model.safetensors").write_bytes(b""))


@case("rev")
def tensor_shape_differs(d, w):
    def damage(f: Path) -> None:
        state = load_file(str(f / "model.safetensors"))
        name = next(n for n in state if "mlp.up_proj" in n)
        state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
        save_file(state, str(f / "model.safetensors"))

    return _expert(d, w, damage)


@case("lacks")
def tensor_missing(d, w):
    def damage(f: Path) -> None:
        state = load_file(str(f / "model.safetensors"))
        state.pop(next(n for n in state if "mlp.up_proj" in n))
        save_file(state, str(f / "model.safetensors"))

    return _expert(d, w, damage)


@case("has no weights")
def weights_missing(d, w):
    return _expert(d, w, lambda f: (f / "model.safetensors").unlink())


def _to_bin(f: Path) -> None:
    state = load_file(str(f / "model.safetensors"))
    (f / "model.safetensors").unlink()
    torch.save(state, f / "pytorch_model.bin")


@case("allow_pickle")
def pickle_checkpoint_refused(d, w):
    return _expert(d, w, _to_bin)


@case("pytorch_model.bin", extra=("payload-ran",))
def pickle_checkpoint_with_code(d, w):
    def damage(f: Path) -> None:
        (f / "model.safetensors").unlink()
        (f / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Payload(d / "payload-ran")}))

    return _expert(d, w, damage, allow_pickle=True)


@case("pytorch_model.bin")
def pickle_checkpoint_garbage(d, w):
    def damage(f: Path) -> None:
        (f / "model.safetensors").unlink()
        (f / "pytorch_model.bin").write_bytes(b"\x00" * 64)

    return _expert(d, w, damage, allow_pickle=True)


@case("pytorch_model.bin")
def pickle_checkpoint_not_a_state_dict(d, w):
    def damage(f: Path) -> None:
        (f / "model.safetensors").unlink()
        torch.save([torch.zeros(2)], f / "pytorch_model.bin")

    return _expert(d, w, damage, allow_pickle=True)


@case("expert.safetensors")
def expert_is_a_file(d, w):
    (d / "expert.safetensors").write_bytes(b"x")
    return _run(d, w, lambda s: s["models"]["experts"].__setitem__("rev", str(d / "expert.safetensors")))


@case("index.json")
def shard_index_broken(d, w):
    return _expert(d, w, lambda f: (f / "model.safetensors.index.json").write_text("{}"))


@case("tokenizer")
def base_tokenizer_broken(d, w):
    return _base(d, w, lambda f: (f / "tokenizer.json").write_text("{"))


def _adapter(d: Path, w: World, **config: object) -> list[str]:
    """A run with the zoo's LoRA adapter as a third expert, its adapter_config.json edited."""
    folder = Path(shutil.copytree(w.zoo / "adapters" / "rev-lora", d / "adapter"))
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return _run(d, w, lambda s: s["models"]["experts"].__setitem__("lora", str(folder)))


@case("adapter_config.json")
def lora_alpha_not_a_number(d, w):
    return _adapter(d, w, lora_alpha="sixteen")


@case("adapter_config.json")
def lora_rank_disagrees_with_the_weights(d, w):
    return _adapter(d, w, r=3)


# ------------------------------------------------------------------------------------ calibration


@case("calib.jsonl:2")
def calib_not_utf8(d, w):
    return _calib(d, w, b'{"prompt": "a", "answer": "b"}\n{"prompt": "\xff", "answer": "b"}\n')


@case("calib.jsonl")
def calib_bad_json(d, w):
    return _calib(d, w, b'{"prompt": "a", "answer": "b"}\n{"prompt": \n')


@case("calib.jsonl")
def calib_empty(d, w):
    return _calib(d, w, b"\n\n")


@case("calib.jsonl")
def calib_row_is_a_list(d, w):
    return _calib(d, w, b'["a", "b"]\n')


@case("calib.jsonl")
def calib_row_missing_answer(d, w):
    return _calib(d, w, b'{"prompt": "a"}\n')


@case("calib.jsonl")
def calib_mixed_kinds(d, w):
    return _calib(d, w, b'{"prompt": "a", "answer": "b"}\n{"text": "plain text"}\n')


@case("calib.jsonl")
def calib_bad_json_with_workers(d, w):
    # `run --workers` checks the calibration sets itself before its run folder exists
    return [*_calib(d, w, b'{"prompt": "a", "answer": "b"}\n{"prompt": \n'), "--workers", "2"]


@case("calib.jsonl")
def calib_is_a_folder(d, w):
    (d / "calib.jsonl").mkdir()
    return _run(d, w, lambda s: s["objectives"][0].__setitem__("data", str(d / "calib.jsonl")))


@case("calib.jsonl:2")
def calib_answer_empty(d, w):
    return _calib(d, w, b'{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": ""}\n')


@case("calib.jsonl")
def calib_item_longer_than_the_context(d, w):
    (d / "calib.jsonl").write_text(json.dumps({"prompt": "ab" * 20000, "answer": "b"}) + "\n")
    return _run(d, w, lambda s: s["objectives"][0].update(data=str(d / "calib.jsonl"), size=1))


# ------------------------------------------------------------------------------------ run folders


@case("--run-dir", usage=True)
def run_dir_is_a_file(d, w):
    (d / "afile").write_text("x")
    return ["run", _write_spec(d, w.spec()), "--run-dir", "afile"]


@case("run folder")
def run_dir_under_a_file(d, w):
    (d / "afile").write_text("x")
    return ["run", _write_spec(d, w.spec()), "--run-dir", "afile/run"]


@case("run folder")
def run_dir_not_a_run(d, w):
    (d / "busy").mkdir()
    (d / "busy" / "notes.txt").write_text("mine")
    return ["run", _write_spec(d, w.spec()), "--run-dir", "busy"]


@case("different spec")
def run_dir_of_another_spec(d, w):
    run = _copy_run(d, w)
    spec = w.spec()
    spec["budget"]["evaluations"] = 5
    return ["run", _write_spec(d, spec), "--run-dir", str(run)]


@case("not a run folder")
def resume_not_a_run(d, w):
    (d / "empty").mkdir()
    return ["resume", "empty"]


@case("not a run folder")
def resume_missing_folder(d, w):
    return ["resume", "nowhere"]


@case("state.json")
def resume_state_garbage(d, w):
    run = _copy_run(d, w)
    (run / "state.json").write_text("{truncated")
    return ["resume", str(run)]


@case("state.json")
def resume_state_not_utf8(d, w):
    run = _copy_run(d, w)
    (run / "state.json").write_bytes(b'{"status": "\xff"}')
    return ["resume", str(run)]


@case("state.json")
def resume_state_a_list(d, w):
    run = _copy_run(d, w)
    (run / "state.json").write_text("[]")
    return ["resume", str(run)]


@case("spec.yaml")
def resume_spec_bad_yaml(d, w):
    run = _copy_run(d, w)
    (run / "spec.yaml").write_text("name: [x\n")
    return ["resume", str(run)]


@case("spec.yaml")
def resume_spec_not_utf8(d, w):
    run = _copy_run(d, w)
    (run / "spec.yaml").write_bytes(b"name: \xfe\n")
    return ["resume", str(run)]


@case("trust_remote_code")
def resume_spec_remote_code(d, w):
    run = _copy_run(d, w)
    _edit_run_spec(run, lambda s: s["models"].__setitem__("trust_remote_code", True))
    return ["resume", str(run)]


@case("models.base")
def resume_base_moved(d, w):
    run = _copy_run(d, w)
    _edit_run_spec(run, lambda s: s["models"].__setitem__("base", str(d / "moved")))
    return ["resume", str(run)]


@case("storage")
def resume_storage_unknown(d, w):
    run = _copy_run(d, w)
    _edit_run_spec(run, lambda s: s.__setitem__("storage", "foo://x"))
    return ["resume", str(run)]


@case("ledger.log: line 3")
def resume_ledger_line_damaged(d, w):
    run = _copy_run(d, w)
    lines = (run / "ledger.log").read_bytes().splitlines(keepends=True)
    (run / "ledger.log").write_bytes(b"".join([*lines[:2], b"garbage{not json\n", *lines[2:]]))
    return ["resume", str(run)]


@case("space_fingerprint")
def resume_spec_space_edited(d, w):
    run = _copy_run(d, w)
    _edit_run_spec(run, lambda s: s["space"].__setitem__("method", "dare_ties"))
    return ["resume", str(run)]


# ------------------------------------------------------------------------------ inspection commands


@case("--trial")
def export_unknown_trial(d, w):
    return ["export", str(_copy_run(d, w)), "--trial", "999", "--out", "out"]


@case("--trial", usage=True)
def export_trial_not_a_number(d, w):
    return ["export", str(_copy_run(d, w)), "--trial", "first"]


@case("--out", usage=True)
def export_out_is_a_file(d, w):
    (d / "afile").write_text("x")
    return ["export", str(_copy_run(d, w)), "--trial", "0", "--out", "afile"]


@case("--out")
def export_out_under_a_file(d, w):
    (d / "afile").write_text("x")
    return ["export", str(_copy_run(d, w)), "--trial", "0", "--out", "afile/model"]


@case("--stage")
def export_unknown_stage(d, w):
    return ["export", str(_copy_run(d, w)), "--trial", "0", "--stage", "nope", "--out", "out"]


@case("not a run folder")
def export_not_a_run(d, w):
    (d / "empty").mkdir()
    return ["export", "empty", "--trial", "0", "--out", "out"]


@case("--out", usage=True)
def report_out_is_a_folder(d, w):
    (d / "folder").mkdir()
    return ["report", str(_copy_run(d, w)), "--out", "folder"]


@case("--out")
def report_out_under_a_file(d, w):
    (d / "afile").write_text("x")
    return ["report", str(_copy_run(d, w)), "--out", "afile/report.html"]


@case("/proc/version")
def report_out_where_nothing_can_be_written(d, w):
    return ["report", str(_copy_run(d, w)), "--out", "/proc/version"]


@case("not a run folder")
def report_not_a_run(d, w):
    (d / "empty").mkdir()
    return ["report", "empty"]


@case("--stage")
def front_unknown_stage(d, w):
    return ["front", str(_copy_run(d, w)), "--stage", "nope"]


@case("comparison.json")
def status_comparison_corrupt(d, w):
    run = _copy_run(d, w)
    (run / "comparison.json").write_text("{")
    return ["status", str(run)]


@case("ledger")
def status_ledger_corrupt(d, w):
    run = _copy_run(d, w)
    (run / "ledger.log").write_bytes(b"\x00\x01 not a journal\n")
    return ["status", str(run)]


@case("no such spec")
def batch_spec_missing(d, w):
    return ["batch", "missing.yaml", "--batch-dir", "batch"]


def _evolve_config(d: Path, w: World, *, genome: dict | None = None, task: dict | None = None) -> str:
    """A mergekit-evolve config over the zoo's models, with ``genome`` / ``task`` entries changed."""
    config = {
        "genome": {"models": [str(w.zoo / "experts" / "rev"), str(w.zoo / "experts" / "sort")], "merge_method": "ties",
                   "base_model": str(w.zoo / "base"), "layer_granularity": 4, **(genome or {})},
        "tasks": [{"name": "arc_easy", **(task or {})}],
    }
    (d / "evol.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return "evol.yml"


@case("tasks['arc_easy'].weight")
def import_evolve_task_weight_not_a_number(d, w):
    return ["import", "mergekit-evolve", _evolve_config(d, w, task={"weight": "abc"}), "--out", "spec.yaml"]


@case("genome.normalize")
def import_evolve_normalize_not_a_flag(d, w):
    return ["import", "mergekit-evolve", _evolve_config(d, w, genome={"normalize": "maybe"}), "--out", "spec.yaml"]


@case("--out")
def import_evolve_out_under_a_file(d, w):
    (d / "afile").write_text("x")
    return ["import", "mergekit-evolve", _evolve_config(d, w), "--out", "afile/spec.yaml"]


# --------------------------------------------------------------------------------------- running


@dataclass
class Outcome:
    returncode: int
    stderr: str
    before: dict[str, str]
    after: dict[str, str]
    present: list[str]


def _run_case(root: Path, w: World, c: Case) -> Outcome:
    d = root / c.id
    d.mkdir()
    args = c.setup(d, w)
    before = snapshot(d)
    proc = evomerge(*args, cwd=d)
    return Outcome(proc.returncode, proc.stderr, before, snapshot(d), [p for p in c.extra if (d / p).exists()])


@pytest.fixture(scope="module")
def outcomes(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("badinput-cases")
    zoo_before = snapshot(world.zoo)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {c.id: pool.submit(_run_case, root, world, c) for c in CASES}
        results = {k: f.result() for k, f in futures.items()}
    assert snapshot(world.zoo) == zoo_before, "a case changed the shared zoo"
    return results


def test_the_corpus_is_large_and_unique() -> None:
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(outcomes: dict[str, Outcome], c: Case) -> None:
    out = outcomes[c.id]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, f"exit {out.returncode}; stderr:\n{out.stderr}"
    if c.usage and lines and lines[0].startswith("Usage:"):
        assert lines[-1].startswith("Error:") and c.culprit in out.stderr, out.stderr
    else:
        assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{out.stderr}"
        assert lines[0].startswith("evomerge: ") and c.culprit in lines[0], lines[0]
    assert out.after == out.before, f"files changed: {set(out.after.items()) ^ set(out.before.items())}"
    assert not out.present, f"a payload ran: {out.present}"
