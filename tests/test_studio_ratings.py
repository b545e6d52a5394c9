"""Arena leaderboard math: Bradley-Terry fit against choix as a reference, order-freedom, intervals, bad votes."""
from __future__ import annotations

import json
import math
import random
import sqlite3

import choix
import numpy as np
import pytest
from choix.opt import PairwiseFcts

from velotune.errors import ConfigError, DataError, VelotuneError
from velotune.studio.ratings import (ELO_SCALE, OUTCOMES, Rating, bootstrap_intervals, leaderboard, to_json,
                                     validate_vote)

NAMES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]


def simulate(strengths: dict[str, float], n_votes: int, seed: int, tie_rate: float = 0.0) -> list[tuple]:
    """Votes drawn from a Bradley-Terry model; a fraction `tie_rate` become "tie" / "both_bad" at random."""
    rng = random.Random(seed)
    names = sorted(strengths)
    votes = []
    for _ in range(n_votes):
        a, b = rng.sample(names, 2)
        if rng.random() < tie_rate:
            votes.append((a, b, rng.choice(["tie", "both_bad"])))
            continue
        p_a = 1.0 / (1.0 + math.exp(strengths[b] - strengths[a]))
        votes.append((a, b, "a" if rng.random() < p_a else "b"))
    return votes


def thetas(table: list[Rating]) -> dict[str, float]:
    """Back from the display scale to centred log-strengths."""
    return {row.name: (row.rating - 1000.0) / ELO_SCALE for row in table}


def centred(params: np.ndarray) -> np.ndarray:
    return params - params.mean()


def choix_pairs(votes, names, decisive_weight: int = 1, with_ties: bool = False) -> list[tuple[int, int]]:
    """(winner, loser) index pairs; a tie/both_bad becomes one win each way (half a win each at weight 2)."""
    index = {name: i for i, name in enumerate(names)}
    pairs = []
    for a, b, outcome in votes:
        if outcome == "a":
            pairs += [(index[a], index[b])] * decisive_weight
        elif outcome == "b":
            pairs += [(index[b], index[a])] * decisive_weight
        elif with_ties:
            pairs += [(index[a], index[b]), (index[b], index[a])]
    return pairs


def test_fit_matches_choix_map_without_ties():
    strengths = dict(zip(NAMES, [1.2, 0.5, 0.0, -0.3, -0.8, 0.9]))
    votes = simulate(strengths, 300, seed=1)
    prior = 0.1
    table = leaderboard(votes, prior=prior)
    names = sorted(strengths)
    # Our penalty is prior/2 * sum(theta^2); choix's is alpha * sum(theta^2).
    reference = centred(choix.opt_pairwise(len(names), choix_pairs(votes, names), alpha=prior / 2, tol=1e-12))
    ours = thetas(table)
    np.testing.assert_allclose([ours[n] for n in names], reference, atol=1e-6)


def test_ties_count_as_half_a_win_each_side_like_choix_doubled_data():
    strengths = dict(zip(NAMES, [0.7, 0.2, 0.0, -0.6, 0.4, -0.1]))
    votes = simulate(strengths, 400, seed=2, tie_rate=0.3)
    assert {"tie", "both_bad"} <= {v[2] for v in votes}
    prior = 0.05
    names = sorted(strengths)
    # Doubling every decisive vote and adding a tie as one win each way doubles our negative log-likelihood,
    # so choix's alpha must equal our prior (2 * prior / 2) for the same optimum.
    data = choix_pairs(votes, names, decisive_weight=2, with_ties=True)
    reference = centred(choix.opt_pairwise(len(names), data, alpha=prior, tol=1e-12))
    ours = thetas(leaderboard(votes, prior=prior))
    np.testing.assert_allclose([ours[n] for n in names], reference, atol=1e-6)


def test_tiny_prior_matches_unpenalised_maximum_likelihood():
    strengths = dict(zip(NAMES[:4], [0.8, 0.1, -0.2, -0.7]))
    votes = simulate(strengths, 400, seed=3)
    names = sorted(strengths)
    reference = centred(choix.ilsr_pairwise(len(names), choix_pairs(votes, names), alpha=0.0, tol=1e-12))
    ours = thetas(leaderboard(votes, prior=1e-9))
    np.testing.assert_allclose([ours[n] for n in names], reference, atol=1e-6)


def test_intervals_come_from_the_inverse_hessian_on_sum_zero_directions():
    strengths = dict(zip(NAMES, [1.0, 0.4, 0.0, -0.2, -0.9, 0.3]))
    votes = simulate(strengths, 250, seed=4)
    prior = 0.1
    table = leaderboard(votes, prior=prior)
    names = sorted(strengths)
    ours = thetas(table)
    params = np.array([ours[n] for n in names])
    hessian = PairwiseFcts(choix_pairs(votes, names), prior / 2).hessian(params)
    # Independent route: parametrise the sum-zero subspace with an orthonormal basis and invert there.
    basis = np.linalg.svd(np.eye(len(names)) - 1.0 / len(names))[0][:, : len(names) - 1]
    covariance = basis @ np.linalg.inv(basis.T @ hessian @ basis) @ basis.T
    half_width = 1.959963984540054 * ELO_SCALE * np.sqrt(np.diag(covariance))
    by_name = {row.name: row for row in table}
    for i, name in enumerate(names):
        row = by_name[name]
        assert row.ci_high - row.rating == pytest.approx(half_width[i], rel=1e-6)
        assert row.rating - row.ci_low == pytest.approx(half_width[i], rel=1e-6)


def test_shuffling_and_swapping_sides_leaves_the_table_bit_for_bit_equal():
    strengths = dict(zip(NAMES, [0.9, 0.3, 0.0, -0.4, 0.6, -1.0]))
    votes = simulate(strengths, 500, seed=5, tie_rate=0.2)
    flip = {"a": "b", "b": "a", "tie": "tie", "both_bad": "both_bad"}
    rng = random.Random(6)
    reordered = [(b, a, flip[o]) if rng.random() < 0.5 else (a, b, o) for a, b, o in votes]
    rng.shuffle(reordered)
    assert to_json(leaderboard(reordered)) == to_json(leaderboard(votes))
    assert bootstrap_intervals(reordered, rounds=20, seed=3) == bootstrap_intervals(votes, rounds=20, seed=3)


def test_recovers_known_strengths_and_intervals_cover_them():
    true = {f"m{i}": 0.45 * i for i in range(8)}
    votes = simulate(true, 4000, seed=7)
    table = leaderboard(votes, prior=0.01)
    assert [row.name for row in table] == sorted(true, key=lambda n: -true[n])
    mean = sum(true.values()) / len(true)
    covered = sum(row.ci_low <= 1000 + ELO_SCALE * (true[row.name] - mean) <= row.ci_high for row in table)
    assert covered >= 6
    assert abs(sum(row.rating for row in table) / len(table) - 1000.0) < 1e-9


def test_intervals_shrink_as_votes_grow():
    strengths = dict(zip(NAMES[:4], [0.5, 0.0, -0.2, 0.3]))
    votes = simulate(strengths, 200, seed=8)
    small = {row.name: row.ci_high - row.ci_low for row in leaderboard(votes, prior=1e-6)}
    large = {row.name: row.ci_high - row.ci_low for row in leaderboard(votes * 4, prior=1e-6)}
    for name in small:
        # Same proportions, four times the votes: the estimate is unchanged and the width halves.
        assert large[name] == pytest.approx(small[name] / 2, rel=1e-4)


def test_symmetric_round_robin_gives_equal_ratings_listed_by_name():
    names = ["zeta", "eta", "theta", "iota"]
    votes = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            votes += [(a, b, "a"), (a, b, "b"), (b, a, "tie")]
    table = leaderboard(votes)
    assert [row.name for row in table] == sorted(names)
    for row in table:
        assert row.rating == pytest.approx(1000.0, abs=1e-9)
        assert (row.games, row.wins, row.losses, row.ties, row.both_bad) == (9, 3, 3, 3, 0)
    assert len({round(row.ci_high - row.ci_low, 9) for row in table}) == 1


def test_counts_per_model():
    votes = [("A", "B", "a"), ("B", "A", "a"), ("B", "A", "b"), ("A", "C", "tie"), ("C", "B", "both_bad")]
    rows = {row.name: row for row in leaderboard(votes)}
    assert (rows["A"].games, rows["A"].wins, rows["A"].losses, rows["A"].ties, rows["A"].both_bad) == (4, 2, 1, 1, 0)
    assert (rows["B"].games, rows["B"].wins, rows["B"].losses, rows["B"].ties, rows["B"].both_bad) == (4, 1, 2, 0, 1)
    assert (rows["C"].games, rows["C"].wins, rows["C"].losses, rows["C"].ties, rows["C"].both_bad) == (2, 0, 0, 1, 1)


def test_edge_cases_are_defined_and_finite():
    assert leaderboard([]) == []
    assert bootstrap_intervals([], rounds=5) == {}
    assert to_json([]) == []

    one_pair = leaderboard([("A", "B", "a")])
    assert [row.name for row in one_pair] == ["A", "B"]
    assert one_pair[0].rating > 1000 > one_pair[1].rating
    assert one_pair[0].rating - 1000 == pytest.approx(1000 - one_pair[1].rating)

    undefeated = leaderboard([("A", "B", "a")] * 50 + [("B", "C", "a")] * 5 + [("C", "B", "a")] * 5)
    assert undefeated[0].name == "A"
    assert all(math.isfinite(v) for row in undefeated for v in (row.rating, row.ci_low, row.ci_high))

    only_ties = {row.name: row for row in leaderboard(
        [("T", "A", "tie"), ("T", "B", "both_bad"), ("A", "B", "a"), ("A", "B", "b")])}
    assert only_ties["T"].wins == only_ties["T"].losses == 0
    assert only_ties["T"].rating == pytest.approx(only_ties["A"].rating, abs=1e-9)

    no_decisive = leaderboard([("A", "B", "tie"), ("B", "C", "both_bad")])
    assert all(row.rating == pytest.approx(1000.0, abs=1e-9) for row in no_decisive)


def test_disconnected_groups_are_defined_with_wide_relative_intervals():
    group_one = [("A", "B", "a")] * 30 + [("B", "A", "a")] * 10
    group_two = [("C", "D", "a")] * 30 + [("D", "C", "a")] * 10
    table = {row.name: row for row in leaderboard(group_one + group_two)}
    connected = {row.name: row for row in leaderboard(group_one + group_two + [("A", "C", "tie")] * 40)}
    assert table["A"].rating == pytest.approx(table["C"].rating)
    for name in "ABCD":
        assert math.isfinite(table[name].ci_low) and math.isfinite(table[name].ci_high)
        # Without any link between the groups, only the prior ties them together: much wider intervals.
        assert table[name].ci_high - table[name].ci_low > 2 * (connected[name].ci_high - connected[name].ci_low)


def test_bootstrap_roughly_agrees_with_hessian_intervals():
    strengths = dict(zip(NAMES[:5], [0.6, 0.2, 0.0, -0.3, -0.5]))
    votes = simulate(strengths, 3000, seed=9, tie_rate=0.1)
    table = leaderboard(votes, prior=0.01)
    boot = bootstrap_intervals(votes, rounds=200, seed=1, prior=0.01)
    assert set(boot) == {row.name for row in table}
    for row in table:
        low, high = boot[row.name]
        assert low < row.rating < high
        assert 0.7 < (high - low) / (row.ci_high - row.ci_low) < 1.4
    assert bootstrap_intervals(votes, rounds=30, seed=5) == bootstrap_intervals(votes, rounds=30, seed=5)


@pytest.mark.parametrize("vote, message", [
    (("A", "B", "win"), "unknown outcome 'win'"),
    (("A", "A", "a"), "voted against itself"),
    (("", "B", "a"), "model_a must be a non-empty"),
    (("A", None, "a"), "model_b must be a non-empty"),
    (("A", "B"), "expected (model_a, model_b, outcome)"),
    ("A B", "got the string"),
    ({"model_a": "A", "outcome": "a"}, "missing field(s) model_b"),
])
def test_bad_votes_are_rejected_naming_the_index(vote, message):
    votes = [("A", "B", "a"), ("B", "C", "tie"), vote]
    with pytest.raises(DataError, match=r"vote 2 \(0-based\)") as caught:
        leaderboard(votes)
    assert message in str(caught.value)
    assert isinstance(caught.value, VelotuneError) and isinstance(caught.value, ValueError)


def test_mappings_and_sqlite_rows_are_accepted():
    connection = sqlite3.connect(":memory:")
    connection.row_factory = sqlite3.Row
    connection.execute("create table votes (model_a text, model_b text, outcome text)")
    tuples = [("A", "B", "a"), ("B", "C", "tie"), ("C", "A", "b"), ("A", "C", "both_bad")]
    connection.executemany("insert into votes values (?, ?, ?)", tuples)
    rows = connection.execute("select * from votes").fetchall()
    dicts = [{"model_a": a, "model_b": b, "outcome": o} for a, b, o in tuples]
    assert leaderboard(rows) == leaderboard(dicts) == leaderboard(tuples)
    assert validate_vote({"model_a": "A", "model_b": "B", "outcome": "tie"}) == ("A", "B", "tie")
    assert OUTCOMES == ("a", "b", "tie", "both_bad")


@pytest.mark.parametrize("settings", [{"prior": 0.0}, {"prior": float("nan")}, {"scale": -1.0},
                                      {"confidence": 1.0}])
def test_bad_settings_are_config_errors(settings):
    with pytest.raises(ConfigError):
        leaderboard([("A", "B", "a")], **settings)
    with pytest.raises(ConfigError, match="rounds"):
        bootstrap_intervals([("A", "B", "a")], rounds=1)


def test_to_json_is_plain_and_serialisable():
    table = leaderboard([("A", "B", "a"), ("B", "C", "b")])
    payload = to_json(table)
    assert list(payload[0]) == ["name", "rating", "ci_low", "ci_high", "games", "wins", "losses", "ties",
                                "both_bad"]
    assert json.loads(json.dumps(payload)) == payload
    assert [row["name"] for row in payload] == [row.name for row in table]
