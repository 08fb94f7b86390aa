"""Every third-party module the package imports is a declared runtime dependency.

The test environment has the test extras (mergekit pulls in peft, accelerate, ...), so a module
the product imports but pyproject.toml forgets still imports here: that is how `peft` went
missing and README command 1 failed on a fresh machine while the suite stayed green. This test
reads every import statement of the package, lazy ones inside functions included, and compares
them with the installed package's own requirements. (`.ci/run` also runs the quick demo in an
environment without the extras, which catches what a static scan cannot.)
"""
from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("merge", "objectives", "search", "experiments")
#: Imports allowed outside the runtime dependencies: module -> (extra that provides it, the only
#: files that may import it). vLLM is the optional GPU scorer; lm-eval the optional task objectives;
#: mergekit is the peer that the scoring benchmark compares with (its on-disk loop), not a
#: dependency of the product.
OPTIONAL = {
    "vllm": ("vllm", {"objectives/_vllm_compat.py", "objectives/_vllm_scorer.py", "objectives/_vllm_worker.py"}),
    "mergekit": ("test", {"experiments/benchmarks/scoring_speed.py"}),
    "lm_eval": ("lm-eval", {"objectives/_lm_eval.py"}),
    "jinja2": ("lm-eval", {"objectives/_lm_eval.py"}),
}


def _imports() -> dict[str, set[str]]:
    """Top-level third-party module -> files (relative to the repository) that import it."""
    found: dict[str, set[str]] = {}
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    mod = name.split(".")[0]
                    if mod in sys.stdlib_module_names or mod in ("evomerge", "__future__"):
                        continue
                    found.setdefault(mod, set()).add(str(path.relative_to(ROOT)))
    return found


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> tuple[set[str], dict[str, set[str]]]:
    """(runtime requirement names, extra -> requirement names) of the installed evomerge."""
    runtime: set[str] = set()
    extras: dict[str, set[str]] = {}
    for req in metadata.requires("evomerge") or []:
        name = _normalize(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        if extra:
            extras.setdefault(extra.group(1), set()).add(name)
        else:
            runtime.add(name)
    return runtime, extras


def test_every_imported_module_is_declared() -> None:
    runtime, extras = _requirements()
    dists = metadata.packages_distributions()
    undeclared = []
    for mod, files in sorted(_imports().items()):
        names = {_normalize(d) for d in dists.get(mod, [mod])}
        if names & runtime:
            continue
        if mod in OPTIONAL:
            extra, allowed = OPTIONAL[mod]
            assert names & extras.get(extra, set()), f"{mod} is allowed as extra {extra!r}, which does not list it"
            assert files <= allowed, f"{mod} (extra {extra!r}) is imported outside {sorted(allowed)}: {sorted(files - allowed)}"
            continue
        undeclared.append(f"{mod} (distribution {'/'.join(sorted(names))}) imported by {', '.join(sorted(files))}")
    assert not undeclared, "imported but not in pyproject.toml's dependencies:\n" + "\n".join(undeclared)


def test_the_scan_sees_lazy_imports() -> None:
    """The scan must include imports inside functions (peft is imported lazily by the zoo builder)."""
    assert "experiments/zoo/build.py" in _imports()["peft"]
