"""Independent TPE's proposals for all float parameters of a trial in one numpy pass.

optuna's independent TPE (``TPESampler`` with ``multivariate=False``, its default with several
objectives) samples a trial's parameters one by one: per parameter it builds two Parzen
estimators (the good trials' and the bad ones'), draws ``n_ei_candidates`` points from the good
one, scores them by the two log-densities and keeps the best. The per-parameter arithmetic is
the same for every parameter, only the numbers differ, and at 32 parameters optuna's Python and
numpy call overhead on arrays of a few dozen numbers is most of a proposal's cost (about 1 ms per
parameter). Within one proposal (`search._propose`) the trials, their split into good and bad,
and the Parzen weights are the same for every parameter, so this module does every parameter's
step at once on (parameters x kernels) and (parameters x candidates) arrays and then serves the
sampler's per-parameter ``_sample`` calls from the result.

It is the same algorithm, proposal for proposal, bit for bit (tests/search/test_tpe_batch.py):

* the random state is drawn from exactly as optuna draws from it: per parameter, in the order the
  trial suggests them, ``choice(n_kernels, p=weights, size=n_ei_candidates)`` then
  ``uniform(0, 1, size=(1, n_ei_candidates))`` (``_MixtureOfProductDistribution.sample`` and
  ``_truncnorm.rvs``); all draws happen at the first parameter's call, which is only valid if
  nothing else draws from that state before the last parameter's call: hence all or nothing;
* every number is computed by the same IEEE operations on the same operands: elementwise
  arithmetic, numpy's transcendental ufuncs (the same loop, whatever the array shape),
  reductions over the same contiguous rows (max, the pairwise sum), argsort and argmax per row;
  optuna's own helpers (``_truncnorm.logpdf``, ``_log_gauss_mass``, ``_log_ndtr``,
  ``_log_sum``) run on the batched arrays, with two exceptions that are not elementwise in
  optuna and so are done here per group of numbers that optuna handles in one call:
  ``_erf.erf`` switches to a polynomial approximation from 2000 numbers up, so the batched
  arrays go to it in chunks of whole parameters below that size (a parameter with 2000 or more
  kernels alone, as optuna does), and ``_ndtri_exp`` iterates Newton's method until every number
  of its call has converged, so `_ndtri_exp_grouped` stops each of optuna's calls (one per
  parameter and tail of the truncated normal) where optuna's own call would stop.

Everything else falls back to optuna's per-parameter code, unchanged (`_fallback_reason`).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import numpy as np
import optuna
import optuna.samplers._tpe.sampler as _tpe
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers._tpe import _truncnorm
from optuna.samplers._tpe.parzen_estimator import _ParzenEstimator, _ParzenEstimatorParameters
from optuna.trial import FrozenTrial, TrialState

_ERF_VECTOR_SIZE = 2000
"""From this many numbers on, ``_erf.erf`` uses its polynomial approximation instead of
``math.erf`` per number: the results differ in the last bits."""

_GAMMAS = (_tpe.default_gamma, _tpe.default_gamma_multiobjective, _tpe.hyperopt_default_gamma)


def _fallback_reason(
    sampler: optuna.samplers.BaseSampler, study: optuna.Study, distributions: Mapping[str, BaseDistribution],
) -> str | None:
    """Why a proposal with these ``distributions`` goes through optuna's per-parameter code, or
    None when it is batched. The batched math is that of plain independent TPE on continuous
    float parameters with optuna's own weights and gamma; the rest is optuna's code path, so a
    sampler or option not covered here still proposes what optuna proposes, at optuna's cost."""
    if type(sampler) is not _tpe.TPESampler:
        return "not a plain optuna TPESampler (a subclass may change the algorithm)"
    if sampler._is_multivariate(study):
        return "multivariate (or group) TPE samples jointly, not per parameter"
    if sampler._parzen_estimator_cls is not _ParzenEstimator:
        return "custom Parzen estimator class"
    parameters = sampler._parzen_estimator_parameters
    if parameters.weights is not _tpe.default_weights:
        return "custom weights function"
    if sampler._gamma is not None and sampler._gamma not in _GAMMAS:
        return "custom gamma function"
    if parameters.prior_weight < 0:
        return "negative prior weight (optuna raises)"
    if sampler._n_ei_candidates >= _ERF_VECTOR_SIZE:
        return "n_ei_candidates >= 2000 (optuna's erf of one parameter's candidates is not math.erf)"
    for name, distribution in distributions.items():
        if distribution.single():
            continue  # no sampler call: the trial takes its only value
        if type(distribution) is not FloatDistribution or distribution.log or distribution.step is not None:
            return f"parameter {name!r} is not a continuous linear float ({distribution})"
    return None


def _observations(trials: list[FrozenTrial], names: list[str]) -> np.ndarray | None:
    """The trials' values of ``names`` as (parameters x trials), as optuna's
    ``_get_internal_repr`` reads them for one parameter at a time (``float(value)``); None when
    one trial lacks one of the parameters (each parameter would see its own set of trials) or a
    value is not a plain number (optuna's conversion and its errors are left to optuna)."""
    try:
        rows = [[trial.params[name] for name in names] for trial in trials]
    except KeyError:
        return None
    if not all(type(value) in (float, int) for row in rows for value in row):
        return None
    values = np.array(rows, dtype=np.float64).reshape(len(trials), len(names))
    if np.isnan(values).any():
        return None
    return np.ascontiguousarray(values.T)


def _weights(n: int, parameters: _ParzenEstimatorParameters, uniform: bool) -> np.ndarray:
    """The mixture weights of an estimator over ``n`` trials plus the prior, as
    ``_ParzenEstimator.__init__`` computes them (uniform for the good trials with several
    objectives, ``_build_parzen_estimator``)."""
    weights = np.ones(n) if uniform else _ParzenEstimator._call_weights_func(parameters.weights, n)
    weights = np.array([1.0]) if n == 0 else np.append(weights, [parameters.prior_weight])
    weights /= weights.sum()
    return weights


def _kernels(
    observations: np.ndarray, lows: np.ndarray, highs: np.ndarray, parameters: _ParzenEstimatorParameters,
) -> tuple[np.ndarray, np.ndarray]:
    """Means and standard deviations (parameters x kernels, the prior last) of every
    parameter's estimator: ``_ParzenEstimator._calculate_numerical_distributions`` per row."""
    n_params, n = observations.shape
    order = np.argsort(observations, axis=1)  # per contiguous row: optuna's argsort, ties included
    ends = np.empty((n_params, n + 2))
    ends[:, 0], ends[:, -1] = lows, highs
    ends[:, 1:-1] = np.take_along_axis(observations, order, axis=1)
    sorted_sigmas = np.maximum(ends[:, 1:-1] - ends[:, :-2], ends[:, 2:] - ends[:, 1:-1])
    if not parameters.consider_endpoints and n + 2 >= 4:
        sorted_sigmas[:, 0] = ends[:, 2] - ends[:, 1]
        sorted_sigmas[:, -1] = ends[:, -2] - ends[:, -3]
    sigmas = np.empty_like(sorted_sigmas)
    np.put_along_axis(sigmas, order, sorted_sigmas, axis=1)
    spans = highs - lows
    min_sigmas = spans / min(100.0, 1.0 + (n + 1)) if parameters.consider_magic_clip else np.full(n_params, _tpe.EPS)
    sigmas = np.clip(sigmas, min_sigmas[:, None], spans[:, None])
    mus = np.concatenate([observations, (0.5 * (lows + highs))[:, None]], axis=1)
    return mus, np.concatenate([sigmas, spans[:, None]], axis=1)


def _row_chunks(n_rows: int, row_size: int) -> list[slice]:
    """Runs of whole rows with fewer than 2000 numbers together (a longer row alone), so that
    ``_erf.erf`` takes for each number the path it takes in optuna's call for that row alone."""
    per_chunk = max(1, (_ERF_VECTOR_SIZE - 1) // max(1, row_size))
    return [slice(start, start + per_chunk) for start in range(0, n_rows, per_chunk)]


def _log_gauss_mass(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``_truncnorm._log_gauss_mass`` of (parameters x n) arrays, one chunk of rows at a time."""
    return np.concatenate([_truncnorm._log_gauss_mass(a[rows], b[rows]) for rows in _row_chunks(*a.shape)])


def _ndtri_exp_grouped(y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``_truncnorm._ndtri_exp`` of several of optuna's calls at once: ``groups`` (sorted) says
    which call each number belongs to. optuna iterates Newton's method until all numbers of a
    call have converged, so a number's last bits depend on its call's slowest number: here each
    group stops updating at the iteration where optuna's call for it stops."""
    flipped = y > -1e-2
    z = y.copy()
    z[flipped] = np.log(-np.expm1(y[flipped]))
    x = np.empty_like(y)
    if (small_inds := np.nonzero(z < -5))[0].size:
        x[small_inds] = -np.sqrt(-2.0 * (z[small_inds] + _truncnorm._norm_pdf_logC))
    if (moderate_inds := np.nonzero(z >= -5))[0].size:
        x[moderate_inds] = -_truncnorm._ndtri_exp_approx_C * np.log(np.expm1(-z[moderate_inds]))

    active = np.arange(y.size)
    for _ in range(100):
        x_active = x[active]
        log_ndtr_x = _truncnorm._log_ndtr(x_active)
        log_norm_pdf_x = -0.5 * x_active**2 - _truncnorm._norm_pdf_logC
        dx = (log_ndtr_x - z[active]) * np.exp(log_ndtr_x - log_norm_pdf_x)
        x_active -= dx
        x[active] = x_active
        unconverged = groups[active][~(np.abs(dx) < 1e-8 * np.abs(x_active))]
        active = active[np.isin(groups[active], unconverged)]
        if active.size == 0:
            break
    x[flipped] *= -1
    return x


def _ppf(q: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``_truncnorm.ppf`` of (parameters x candidates) arrays: one optuna call per row."""
    rows = np.broadcast_to(np.arange(q.shape[0])[:, None], q.shape)
    case_left = a < 0
    case_right = ~case_left
    log_mass = _log_gauss_mass(a, b)
    out = np.empty_like(q)
    if case_left.any():
        log_phi = _truncnorm._log_sum(_truncnorm._log_ndtr(a[case_left]), np.log(q[case_left]) + log_mass[case_left])
        out[case_left] = _ndtri_exp_grouped(log_phi, rows[case_left])
    if case_right.any():
        log_phi = _truncnorm._log_sum(
            _truncnorm._log_ndtr(-b[case_right]), np.log1p(-q[case_right]) + log_mass[case_right],
        )
        out[case_right] = -_ndtri_exp_grouped(log_phi, rows[case_right])
    out[q == 0] = a[q == 0]
    out[q == 1] = b[q == 1]
    out[a == b] = np.nan
    return out


def _log_pdf(
    x: np.ndarray, mus: np.ndarray, sigmas: np.ndarray, weights: np.ndarray, lows: np.ndarray, highs: np.ndarray,
) -> np.ndarray:
    """Log-density of every parameter's mixture at its candidates (parameters x candidates):
    ``_MixtureOfProductDistribution.log_pdf`` per row."""
    a = ((lows[:, None] - mus) / sigmas)[:, None, :]
    b = ((highs[:, None] - mus) / sigmas)[:, None, :]
    loc, scale = mus[:, None, :], sigmas[:, None, :]
    weighted_log_pdf = np.zeros(x.shape + (mus.shape[1],))
    for rows in _row_chunks(*mus.shape):
        weighted_log_pdf[rows] += _truncnorm.logpdf(x[rows, :, None], a[rows], b[rows], loc[rows], scale[rows])
    weighted_log_pdf += np.log(weights)
    max_ = weighted_log_pdf.max(axis=2)
    max_[np.isneginf(max_)] = 0
    with np.errstate(divide="ignore"):
        return np.log(np.exp(weighted_log_pdf - max_[:, :, None]).sum(axis=2)) + max_


def _proposals(
    sampler: _tpe.TPESampler, study: optuna.Study, trial: FrozenTrial, distributions: Mapping[str, FloatDistribution],
) -> dict[str, float] | None:
    """What ``sampler._sample(study, trial, {name: distribution})`` returns, for every entry of
    ``distributions`` called in order; None (nothing drawn) when the trials do not all hold
    every parameter. The trial selection and split are ``TPESampler._sample``'s."""
    if sampler._constant_liar:
        states = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING]
    else:
        states = [TrialState.COMPLETE, TrialState.PRUNED]
    trials = study._get_trials(deepcopy=False, states=states, use_cache=not sampler._constant_liar)
    if sampler._constant_liar:
        trials = [t for t in trials if trial.number != t.number]
    if sampler._gamma is None:
        multi = len(study.directions) > 1
        sampler._gamma = _tpe.default_gamma_multiobjective if multi else _tpe.default_gamma
    n = sum(t.state != TrialState.RUNNING for t in trials)
    below_trials, above_trials = _tpe._split_trials(study, trials, sampler._gamma(n))

    names = list(distributions)
    below, above = _observations(below_trials, names), _observations(above_trials, names)
    if below is None or above is None:
        return None
    lows = np.array([distributions[name].low for name in names])
    highs = np.array([distributions[name].high for name in names])
    parameters = sampler._parzen_estimator_parameters
    weights_below = _weights(below.shape[1], parameters, uniform=study._is_multi_objective())
    weights_above = _weights(above.shape[1], parameters, uniform=False)
    mus_below, sigmas_below = _kernels(below, lows, highs, parameters)
    mus_above, sigmas_above = _kernels(above, lows, highs, parameters)

    rng, n_candidates = sampler._rng.rng, sampler._n_ei_candidates
    active = np.empty((len(names), n_candidates), dtype=np.int64)
    quantiles = np.empty((len(names), n_candidates))
    for i in range(len(names)):
        active[i] = rng.choice(len(weights_below), p=weights_below, size=n_candidates)
        quantiles[i] = rng.uniform(low=0, high=1, size=(1, n_candidates))[0]
    active_mus = np.take_along_axis(mus_below, active, axis=1)
    active_sigmas = np.take_along_axis(sigmas_below, active, axis=1)
    candidates = _ppf(
        quantiles, (lows[:, None] - active_mus) / active_sigmas, (highs[:, None] - active_mus) / active_sigmas,
    ) * active_sigmas + active_mus

    acquisition = _log_pdf(candidates, mus_below, sigmas_below, weights_below, lows, highs) - _log_pdf(
        candidates, mus_above, sigmas_above, weights_above, lows, highs,
    )
    best = candidates[np.arange(len(names)), np.argmax(acquisition, axis=1)]
    return {name: distributions[name].to_external_repr(value) for name, value in zip(names, best.tolist())}


class _Batch:
    """One proposal's batched parameters, served to the sampler's ``_sample`` calls in order."""

    def __init__(self, number: int, distributions: Mapping[str, BaseDistribution]) -> None:
        self.number = number
        self.distributions = {name: d for name, d in distributions.items() if not d.single()}
        self.order = list(self.distributions)
        self.decided = False
        self.sampler: _tpe.TPESampler | None = None
        self.values: dict[str, float] = {}

    def serve(
        self, sampler: _tpe.TPESampler, study: optuna.Study, trial: FrozenTrial,
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any] | None:
        """The sampled value for this call, or None to run optuna's own ``_sample``. The batch
        is computed at the proposal's first call (the first parameter), or not at all."""
        if trial.number != self.number or len(search_space) != 1:
            return None
        (name, distribution), = search_space.items()
        if not self.decided:
            self.decided = True
            if self.order and name == self.order[0] and _fallback_reason(sampler, study, self.distributions) is None:
                self.values = _proposals(sampler, study, trial, self.distributions) or {}
                self.sampler = sampler if self.values else None
        if sampler is not self.sampler:
            return None
        if not self.order or name != self.order[0] or distribution != self.distributions[name]:
            # the random state was drawn for the parameters in order: anything else would diverge
            raise RuntimeError(f"TPE sampled {name!r} out of the proposal's order {self.order}")
        self.order.pop(0)
        return {name: self.values.pop(name)}


_local = threading.local()


@contextmanager
def batched(number: int, distributions: Mapping[str, BaseDistribution]) -> Iterator[None]:
    """Within: independent TPE samples trial ``number``'s ``distributions`` (suggested in this
    order, in this thread) from one batch where `_fallback_reason` allows."""
    _local.batch = _Batch(number, distributions)
    try:
        yield
    finally:
        _local.batch = None


_optuna_sample = _tpe.TPESampler._sample


def _sample(
    self: _tpe.TPESampler, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution],
) -> dict[str, Any]:
    """``TPESampler._sample``, served from the proposal's batch where there is one."""
    batch: _Batch | None = getattr(_local, "batch", None)
    served = None if batch is None else batch.serve(self, study, trial, search_space)
    return _optuna_sample(self, study, trial, search_space) if served is None else served


_tpe.TPESampler._sample = _sample  # type: ignore[method-assign]
"""Installed once at import; outside `batched` (another thread, optuna's own study.ask) it is
optuna's method unchanged."""
