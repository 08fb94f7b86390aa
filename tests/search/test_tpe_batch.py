"""`search._tpe_batch`: independent TPE's proposals for all float parameters at once are optuna's
own ``TPESampler`` proposals, bit for bit, and everything it does not cover falls back to optuna."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import optuna
import pytest
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers._tpe.parzen_estimator import _ParzenEstimator, _ParzenEstimatorParameters
from optuna.samplers._tpe.sampler import default_weights
from optuna.trial import TrialState

from evomerge.search import _tpe_batch
from evomerge.search._propose import propose

FLOATS = {f"x{i}": FloatDistribution(-0.5 * (i % 5), 0.25 + 0.75 * i) for i in range(32)}
"""32 float parameters, no two with the same bounds."""
N_STARTUP = 6


def _values(params: dict[str, Any], n_objectives: int) -> list[float]:
    x = np.array([v for name, v in params.items() if name in FLOATS])
    values = [float(np.sum(x**2)), float(np.sum((x - 0.5) ** 2)), float(np.sum(np.abs(x))), float(np.round(x[0], 1))]
    return values[:n_objectives]


def _bits(params: dict[str, Any]) -> list[str]:
    """The values, floats as ``float.hex``: equal means the same bits."""
    return [v.hex() if isinstance(v, float) else repr(v) for v in params.values()]


def _run(
    make: Callable[[], optuna.samplers.BaseSampler], n_objectives: int, distributions: dict[str, BaseDistribution],
    ask: bool, trials: int = 48, batch: int = 4,
) -> tuple[list[list[str]], int]:
    """Proposals (`_bits`) of a study run in
    batches (later asks of a batch see the pending ones), with some trials failed, pruned or
    infeasible; and how many of them the sampler took past its start-up trials."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # optuna's deprecated TPE options
        sampler = make()
    study = optuna.create_study(directions=["minimize"] * n_objectives, sampler=sampler)
    proposed, past_startup = [], 0
    for _ in range(trials // batch):
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        pending = [study.ask(distributions) if ask else propose(study, distributions) for _ in range(batch)]
        past_startup += batch if done >= N_STARTUP else 0
        for trial in pending:
            assert trial is not None
            proposed.append(_bits(trial.params))
            if trial.number % 7 == 3:
                study.tell(trial, state=TrialState.FAIL)
            elif trial.number % 11 == 5:
                study.tell(trial, state=TrialState.PRUNED)
            else:
                trial.set_constraint("c", 1.0 if trial.number % 9 == 2 else -1.0)
                study.tell(trial, _values(trial.params, n_objectives))
    return proposed, past_startup


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the proposals served from a batch (a fallback to optuna's code returns None)."""
    served: list[int] = []
    compute = _tpe_batch._proposals

    def counted(*args: Any) -> dict[str, float] | None:
        values = compute(*args)
        served.extend([1] if values else [])
        return values

    monkeypatch.setattr(_tpe_batch, "_proposals", counted)
    return served


def _tpe(**options: Any) -> Callable[[], optuna.samplers.BaseSampler]:
    return lambda: optuna.samplers.TPESampler(seed=5, n_startup_trials=N_STARTUP, **options)


@pytest.mark.parametrize("make, n_objectives", [
    (_tpe(constant_liar=True), 4),
    (_tpe(constant_liar=True, multivariate=False), 1),
    (_tpe(constant_liar=False), 4),
    (_tpe(constant_liar=True, consider_endpoints=True, consider_magic_clip=False, prior_weight=0.4), 4),
    (_tpe(constant_liar=True, multivariate=False, n_ei_candidates=7), 1),
], ids=["4-objectives", "1-objective", "no-constant-liar", "endpoints-no-clip-prior", "7-candidates"])
def test_batched_proposals_are_optuna_tpe_bit_for_bit(make, n_objectives: int, batches: list[int]) -> None:
    asked, _ = _run(make, n_objectives, FLOATS, ask=True)
    assert not batches
    proposed, past_startup = _run(make, n_objectives, FLOATS, ask=False)
    assert len(batches) == past_startup >= 36  # every TPE proposal came from a batch
    assert proposed == asked


@pytest.mark.parametrize("extra, reason", [
    ({"c": CategoricalDistribution(["a", "b", "c"])}, "not a continuous linear float"),
    ({"i": IntDistribution(0, 10)}, "not a continuous linear float"),
    ({"l": FloatDistribution(1e-3, 1.0, log=True)}, "not a continuous linear float"),
    ({"s": FloatDistribution(0.0, 1.0, step=0.25)}, "not a continuous linear float"),
], ids=["categorical", "int", "log", "step"])
def test_other_distributions_fall_back_to_optuna(
    extra: dict[str, BaseDistribution], reason: str, batches: list[int],
) -> None:
    distributions = {**dict(list(FLOATS.items())[:8]), **extra, **dict(list(FLOATS.items())[8:12])}
    study = optuna.create_study(directions=["minimize"] * 4)
    assert reason in (_tpe_batch._fallback_reason(_tpe()(), study, distributions) or "")
    asked, _ = _run(_tpe(), 4, distributions, ask=True, trials=24)
    proposed, _ = _run(_tpe(), 4, distributions, ask=False, trials=24)
    assert not batches
    assert proposed == asked


def test_constant_parameters_are_left_out_of_the_batch(batches: list[int]) -> None:
    distributions = {**FLOATS, "fixed": FloatDistribution(0.5, 0.5), "one": IntDistribution(3, 3)}
    asked, _ = _run(_tpe(), 4, distributions, ask=True, trials=24)
    proposed, past_startup = _run(_tpe(), 4, distributions, ask=False, trials=24)
    assert len(batches) == past_startup > 0
    assert proposed == asked


@pytest.mark.parametrize("make, n_objectives, reason", [
    (_tpe(), 1, "multivariate"),
    (_tpe(multivariate=True, group=True), 4, "multivariate"),
    (lambda: type("MyTPE", (optuna.samplers.TPESampler,), {})(seed=5, n_startup_trials=N_STARTUP), 4, "plain"),
    (_tpe(gamma=lambda n: min(n, 3)), 4, "gamma"),
    (_tpe(weights=lambda n: np.linspace(0.5, 1.0, n)), 4, "weights"),
], ids=["1-objective-default-multivariate", "group", "subclass", "gamma", "weights"])
def test_other_samplers_fall_back_to_optuna(make, n_objectives: int, reason: str, batches: list[int]) -> None:
    distributions = dict(list(FLOATS.items())[:8])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = make()
    study = optuna.create_study(directions=["minimize"] * n_objectives)
    assert reason in (_tpe_batch._fallback_reason(sampler, study, distributions) or "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        asked, _ = _run(make, n_objectives, distributions, ask=True, trials=24)
        proposed, _ = _run(make, n_objectives, distributions, ask=False, trials=24)
    assert not batches
    assert proposed == asked


def test_trials_lacking_a_parameter_fall_back_to_optuna(batches: list[int]) -> None:
    """Each parameter would see its own set of trials: optuna's code handles that."""
    def run(ask: bool) -> list[list[str]]:
        study = optuna.create_study(directions=["minimize"] * 4, sampler=_tpe()())
        fewer = dict(list(FLOATS.items())[:20])
        for _ in range(N_STARTUP):
            trial = study.ask(fewer)
            study.tell(trial, _values(trial.params, 4))
        out = []
        for _ in range(12):
            trial = study.ask(FLOATS) if ask else propose(study, FLOATS)
            out.append(_bits(trial.params))
            study.tell(trial, _values(trial.params, 4))
        return out

    assert run(ask=False) == run(ask=True)
    assert not batches


@pytest.mark.parametrize("n", [0, 1, 2, 3, 40, 2100])
@pytest.mark.parametrize("endpoints, clip", [(False, True), (True, False)])
def test_estimators_and_log_densities_are_optunas_per_parameter(n: int, endpoints: bool, clip: bool) -> None:
    """The (parameters x kernels) estimators and their log-densities equal optuna's one-parameter
    ones, ties among the observations and optuna's erf switch at 2000 numbers included."""
    rng = np.random.default_rng(n)
    lows, highs = np.array([-1.0, 0.0, 2.0]), np.array([1.0, 0.3, 7.5])
    observations = lows[:, None] + np.round(rng.uniform(size=(3, n)), 1) * (highs - lows)[:, None]
    x = lows[:, None] + rng.uniform(-0.1, 1.1, size=(3, 24)) * (highs - lows)[:, None]
    parameters = _ParzenEstimatorParameters(0.7, clip, endpoints, default_weights, multivariate=True)
    weights = _tpe_batch._weights(n, parameters, uniform=False)
    mus, sigmas = _tpe_batch._kernels(observations, lows, highs, parameters)
    log_pdf = _tpe_batch._log_pdf(x, mus, sigmas, weights, lows, highs)
    for i in range(3):
        space = {"p": FloatDistribution(lows[i], highs[i])}
        estimator = _ParzenEstimator({"p": observations[i].copy()}, space, parameters)
        kernels = estimator._mixture_distribution.distributions[0]
        assert estimator._mixture_distribution.weights.tobytes() == weights.tobytes()
        assert kernels.mu.tobytes() == mus[i].tobytes() and kernels.sigma.tobytes() == sigmas[i].tobytes()
        assert estimator.log_pdf({"p": x[i].copy()}).tobytes() == log_pdf[i].tobytes()
    # the good trials' estimator with several objectives: uniform weights
    uniform = _ParzenEstimator({"p": observations[0].copy()}, space, parameters, np.ones(n))
    assert uniform._mixture_distribution.weights.tobytes() == _tpe_batch._weights(n, parameters, uniform=True).tobytes()
