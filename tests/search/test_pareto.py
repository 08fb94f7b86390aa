"""Pareto archive and hypervolume against hand-computed sets; scalarizations."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.search import ParetoArchive, Scalarization, hypervolume, pareto_mask

# (accuracy: maximize, cost: minimize)
POINTS = {
    "A": (0.9, 5.0),
    "B": (0.8, 3.0),
    "C": (0.7, 4.0),   # dominated by B
    "D": (0.9, 6.0),   # dominated by A
    "E": (0.95, 10.0),  # would be on the front, but infeasible
    "F": (0.5, 1.0),
}
DIRECTIONS = ["maximize", "minimize"]
REFERENCE = [0.0, 10.0]


def test_front_and_hypervolume_history_with_mixed_directions_and_constraints() -> None:
    archive = ParetoArchive(DIRECTIONS, REFERENCE)
    for number, (label, values) in enumerate(POINTS.items()):
        archive.add(number, values, feasible=label != "E")
    archive.add(6, None)  # a failed trial: history grows, front does not
    assert [p.number for p in archive.front] == [0, 1, 5]
    # by hand, as minimization of (-acc, cost) against (0, 10):
    # A alone 0.9*5 = 4.5; + B: 0.1*5 + 0.8*7 = 6.1; + F: 0.1*5 + 0.3*7 + 0.5*9 = 7.1
    expected = [4.5, 6.1, 6.1, 6.1, 6.1, 7.1, 7.1]
    np.testing.assert_allclose([hv for _, hv in archive.history], expected)
    assert [n for n, _ in archive.history] == list(range(7))


def test_points_beyond_the_reference_add_nothing() -> None:
    archive = ParetoArchive(DIRECTIONS, REFERENCE)
    archive.add(0, (-0.1, 2.0))  # accuracy below the reference
    archive.add(1, (0.5, 12.0))  # cost above it
    assert archive.hypervolume() == 0.0 and len(archive.front) == 2


def test_three_objectives_by_hand() -> None:
    points = np.array([[1.0, 1.0, 1.0], [0.0, 1.5, 1.5], [1.5, 1.5, 1.5]])
    directions = ["minimize"] * 3
    assert pareto_mask(points, directions).tolist() == [True, True, False]
    # [1,2]^3 = 1, plus [0,2]x[1.5,2]^2 = 0.5, minus their overlap [1,2]x[1.5,2]^2 = 0.25
    assert hypervolume(points, [2.0, 2.0, 2.0], directions) == pytest.approx(1.25)
    # maximizing the same objectives mirrors the problem
    assert hypervolume(-points, [-2.0, -2.0, -2.0], ["maximize"] * 3) == pytest.approx(1.25)


def test_duplicates_keep_one_member_and_default_reference_is_recorded() -> None:
    archive = ParetoArchive(["minimize", "minimize"])
    archive.add(0, (1.0, 2.0))
    archive.add(1, (1.0, 2.0))
    assert [p.number for p in archive.front] == [0]
    assert archive.reference_point == [2.0, 4.0]  # worse than the first point by max(|v|, 1)
    assert archive.hypervolume() == pytest.approx(2.0)


def test_scalarizations_respect_directions_and_weights() -> None:
    ws = Scalarization("weighted_sum", weights=(2.0, 1.0))
    assert ws((0.5, 3.0), DIRECTIONS) == pytest.approx(2 * -0.5 + 3.0)
    cheb = Scalarization("chebyshev", weights=(1.0, 0.1), ideal=(1.0, 0.0), rho=0.0)
    assert cheb((0.5, 3.0), DIRECTIONS) == pytest.approx(max(1.0 * 0.5, 0.1 * 3.0))
    # Chebyshev reaches a point in a non-convex dent that no weighted sum prefers
    front = [(1.0, 10.0), (0.45, 4.5), (0.0, 0.0)]  # (acc, cost); the middle one sits above the chord
    sums = [Scalarization("weighted_sum", weights=(w, 0.1))(p, DIRECTIONS) for w in (0.5, 1.0, 2.0) for p in front]
    assert all(np.argmin(sums[i:i + 3]) != 1 for i in (0, 3, 6))
    chebs = [Scalarization("chebyshev", weights=(1.0, 0.1), ideal=(1.0, 0.0))(p, DIRECTIONS) for p in front]
    assert int(np.argmin(chebs)) == 1
    with pytest.raises(ValueError):
        Scalarization("chebyshev", weights=(-1.0, 1.0))
