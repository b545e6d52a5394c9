"""Arena leaderboard: Bradley-Terry ratings with 95% confidence intervals from the Studio's pairwise votes.

A vote is one row (model_a, model_b, outcome) with outcome one of "a", "b", "tie", "both_bad". The table is a
batch fit, not an online Elo: votes are first tallied into integer counts per (sorted) pair of model names, so
the order the votes arrive in cannot change a single bit of the result.

Model. Each model i has a log-strength theta_i and P(i beats j) = 1 / (1 + exp(theta_j - theta_i)). A "tie" and a
"both_bad" vote each count as half a win for each side: both say "neither was better", which pulls the two
ratings together without saying anything about how good they are in absolute terms (a "both_bad" vote carries
no information about other models, so it cannot lower both ratings on a relative scale).

Fit. Maximum a-posteriori log-strengths: minimise
    -sum over pairs [ s_ij * log P(i beats j) + (n_ij - s_ij) * log P(j beats i) ] + prior / 2 * sum_i theta_i**2
where n_ij is the number of votes between i and j and s_ij is i's score (wins + half of ties and both_bad).
`prior` is the precision (1 / variance) of a zero-mean Gaussian prior on each log-strength. It keeps an
undefeated model's rating finite and makes a disconnected comparison graph well defined (groups of models that
were never compared with each other get very wide intervals relative to one another, as they should). Because
the likelihood does not change when all log-strengths shift together, the optimum has mean log-strength 0.
The objective is strictly convex, so Newton's method with a backtracking line search finds it to ~1e-12.

Display scale. rating_i = center + scale * (theta_i - mean(theta)), with scale = 400 / ln(10) by default, so a
gap of 400 points means 10:1 odds, as in chess Elo, and the unweighted mean over listed models is 1000.

Intervals. The covariance of theta is the inverse of the Hessian of the objective at the optimum (observed
Fisher information plus the prior), projected onto the centred ratings (the shift direction is removed exactly,
see `_centred_covariance`); interval = rating +- z * scale * sd with z the normal quantile (1.96 for 95%).
`bootstrap_intervals` offers percentile intervals by refitting on resampled votes, for comparison.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Iterable

import numpy as np

from velotune.errors import ConfigError, DataError

OUTCOME_A = "a"
OUTCOME_B = "b"
OUTCOME_TIE = "tie"
OUTCOME_BOTH_BAD = "both_bad"
OUTCOMES: tuple[str, ...] = (OUTCOME_A, OUTCOME_B, OUTCOME_TIE, OUTCOME_BOTH_BAD)

# Points per unit of log-strength: 400 points <=> odds of 10 to 1, the familiar chess Elo convention.
ELO_SCALE = 400.0 / math.log(10.0)
ELO_CENTER = 1000.0
DEFAULT_PRIOR = 0.1
DEFAULT_CONFIDENCE = 0.95

# Columns of the per-pair tally, for the pair (first, second) with first < second by name.
_FIRST_WINS, _SECOND_WINS, _TIES, _BOTH_BAD = range(4)
_NEWTON_MAX_STEPS = 200
_NEWTON_STEP_TOL = 1e-12


@dataclass(frozen=True)
class Rating:
    """One leaderboard row. `rating`, `ci_low`, `ci_high` are on the display scale (mean 1000 over the table)."""

    name: str
    rating: float
    ci_low: float
    ci_high: float
    games: int
    wins: int
    losses: int
    ties: int
    both_bad: int


@dataclass(frozen=True)
class _Tally:
    """Votes reduced to counts: sorted model names, pair index arrays (i < j) and per-pair outcome counts."""

    names: tuple[str, ...]
    first: np.ndarray  # int64 [pairs], index into names
    second: np.ndarray  # int64 [pairs], index into names, always > first
    counts: np.ndarray  # int64 [pairs, 4], columns _FIRST_WINS, _SECOND_WINS, _TIES, _BOTH_BAD


def _vote_fields(vote: Any, index: int) -> tuple[Any, Any, Any]:
    """(model_a, model_b, outcome) from a 3-item row, or from a mapping / sqlite3.Row with those keys."""
    if isinstance(vote, (str, bytes)):
        raise DataError(f"vote {index} (0-based): expected (model_a, model_b, outcome), got the string {vote!r}")
    if hasattr(vote, "keys"):
        keys = set(vote.keys())
        missing = [key for key in ("model_a", "model_b", "outcome") if key not in keys]
        if missing:
            raise DataError(f"vote {index} (0-based): missing field(s) {', '.join(missing)}")
        return vote["model_a"], vote["model_b"], vote["outcome"]
    try:
        model_a, model_b, outcome = vote
    except (TypeError, ValueError):
        raise DataError(
            f"vote {index} (0-based): expected (model_a, model_b, outcome), got {vote!r}") from None
    return model_a, model_b, outcome


def validate_vote(vote: Any, index: int = 0) -> tuple[str, str, str]:
    """Check one vote and return it as (model_a, model_b, outcome); DataError naming `index` if it is wrong."""
    model_a, model_b, outcome = _vote_fields(vote, index)
    for field, value in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(value, str) or not value:
            raise DataError(f"vote {index} (0-based): {field} must be a non-empty model name, got {value!r}")
    if outcome not in OUTCOMES:
        raise DataError(
            f"vote {index} (0-based): unknown outcome {outcome!r}; expected one of {', '.join(OUTCOMES)}")
    if model_a == model_b:
        raise DataError(f"vote {index} (0-based): model {model_a!r} was voted against itself")
    return model_a, model_b, outcome


def _tally(votes: Iterable[Any]) -> _Tally:
    by_pair: dict[tuple[str, str], list[int]] = {}
    for index, vote in enumerate(votes):
        model_a, model_b, outcome = validate_vote(vote, index)
        # Key by sorted names so "A vs B" and "B vs A" land in the same row, whatever order they came in.
        swapped = model_b < model_a
        row = by_pair.setdefault((model_b, model_a) if swapped else (model_a, model_b), [0, 0, 0, 0])
        if outcome == OUTCOME_TIE:
            row[_TIES] += 1
        elif outcome == OUTCOME_BOTH_BAD:
            row[_BOTH_BAD] += 1
        elif (outcome == OUTCOME_A) != swapped:
            row[_FIRST_WINS] += 1
        else:
            row[_SECOND_WINS] += 1
    names = tuple(sorted({name for pair in by_pair for name in pair}))
    position = {name: i for i, name in enumerate(names)}
    pairs = sorted(by_pair)
    return _Tally(
        names=names,
        first=np.array([position[a] for a, _ in pairs], dtype=np.int64),
        second=np.array([position[b] for _, b in pairs], dtype=np.int64),
        counts=np.array([by_pair[pair] for pair in pairs], dtype=np.int64).reshape(len(pairs), 4),
    )


def _scores(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(games per pair, score of the first model per pair): ties and both_bad are half a win for each side."""
    counts = counts.astype(np.float64)
    games = counts.sum(axis=1)
    first_score = counts[:, _FIRST_WINS] + 0.5 * (counts[:, _TIES] + counts[:, _BOTH_BAD])
    return games, first_score


def _objective(theta, first, second, games, first_score, prior) -> float:
    diff = theta[first] - theta[second]
    # -log sigmoid(x) = logaddexp(0, -x): stable for large |x|.
    nll = first_score * np.logaddexp(0.0, -diff) + (games - first_score) * np.logaddexp(0.0, diff)
    return float(nll.sum() + 0.5 * prior * np.dot(theta, theta))


def _gradient_hessian(theta, first, second, games, first_score, prior) -> tuple[np.ndarray, np.ndarray]:
    n_models = theta.shape[0]
    diff = theta[first] - theta[second]
    p_first = 0.5 * (1.0 + np.tanh(0.5 * diff))  # sigmoid without overflow
    residual = games * p_first - first_score  # d(objective)/d(theta_first) for each pair
    gradient = prior * theta
    np.add.at(gradient, first, residual)
    np.add.at(gradient, second, -residual)
    # Each pair adds w * [[1, -1], [-1, 1]] with w = n * p * (1 - p): a weighted graph Laplacian.
    weight = games * p_first * (1.0 - p_first)
    hessian = prior * np.eye(n_models)
    np.add.at(hessian, (first, first), weight)
    np.add.at(hessian, (second, second), weight)
    np.add.at(hessian, (first, second), -weight)
    np.add.at(hessian, (second, first), -weight)
    return gradient, hessian


def _fit(n_models: int, first, second, games, first_score, prior: float) -> tuple[np.ndarray, np.ndarray]:
    """MAP log-strengths and the Hessian of the objective there, by damped Newton from zero."""
    args = (first, second, games, first_score, prior)
    theta = np.zeros(n_models)
    value = _objective(theta, *args)
    for _ in range(_NEWTON_MAX_STEPS):
        gradient, hessian = _gradient_hessian(theta, *args)
        step = -np.linalg.solve(hessian, gradient)
        if float(np.max(np.abs(step))) < _NEWTON_STEP_TOL:
            theta = theta + step
            break
        # Backtrack: a full Newton step can overshoot when a model wins (almost) everything.
        slope = float(np.dot(gradient, step))
        t = 1.0
        while True:
            candidate = theta + t * step
            candidate_value = _objective(candidate, *args)
            if candidate_value <= value + 1e-4 * t * slope or t < 1e-12:
                break
            t *= 0.5
        if t < 1e-12:
            break  # no further decrease is representable in floating point: we are at the optimum
        theta, value = candidate, candidate_value
    gradient, hessian = _gradient_hessian(theta, *args)
    total = float(games.sum())
    if not np.all(np.isfinite(theta)) or float(np.max(np.abs(gradient))) > 1e-6 * (1.0 + total):
        raise DataError(
            f"arena ratings: the fit did not converge on {n_models} models and {int(total)} votes "
            f"(largest gradient {float(np.max(np.abs(gradient))):.3g}); try a larger prior")
    return theta, hessian


def _centred_covariance(hessian: np.ndarray) -> np.ndarray:
    """Covariance of theta - mean(theta): the inverse Hessian restricted to sum-zero directions.

    The Hessian is a Laplacian plus prior * I, so the all-ones vector is an eigenvector with eigenvalue `prior`;
    inverting it directly would put a 1/prior (possibly huge) component along that direction only to subtract it
    again. Adding (1/n) * ones * ones^T lifts that one eigenvalue to prior + 1, leaves every other eigenpair
    alone, and the centring projection then removes that direction exactly, without cancellation."""
    n_models = hessian.shape[0]
    lifted = hessian + np.full((n_models, n_models), 1.0 / n_models)
    centring = np.eye(n_models) - np.full((n_models, n_models), 1.0 / n_models)
    covariance = centring @ np.linalg.inv(lifted) @ centring
    return 0.5 * (covariance + covariance.T)


def _check_settings(prior: float, scale: float, confidence: float) -> None:
    if not (isinstance(prior, (int, float)) and math.isfinite(prior) and prior > 0):
        raise ConfigError(f"arena ratings: prior must be a finite number > 0, got {prior!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ConfigError(f"arena ratings: scale must be a finite number > 0, got {scale!r}")
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ConfigError(f"arena ratings: confidence must be between 0 and 1, got {confidence!r}")


def _display(theta: np.ndarray, scale: float, center: float) -> np.ndarray:
    return center + scale * (theta - theta.mean())


def _per_model_counts(tally: _Tally) -> np.ndarray:
    """int64 [models, 5]: games, wins, losses, ties, both_bad."""
    per_model = np.zeros((len(tally.names), 5), dtype=np.int64)
    c = tally.counts
    for side, wins, losses in ((tally.first, _FIRST_WINS, _SECOND_WINS), (tally.second, _SECOND_WINS, _FIRST_WINS)):
        np.add.at(per_model[:, 0], side, c.sum(axis=1))
        np.add.at(per_model[:, 1], side, c[:, wins])
        np.add.at(per_model[:, 2], side, c[:, losses])
        np.add.at(per_model[:, 3], side, c[:, _TIES])
        np.add.at(per_model[:, 4], side, c[:, _BOTH_BAD])
    return per_model


def _sorted_rows(rows: list[Rating]) -> list[Rating]:
    # Round the sort key so equal ratings that differ only in the last bits (symmetric data) list by name.
    return sorted(rows, key=lambda row: (-round(row.rating, 6), row.name))


def leaderboard(votes: Iterable[Any], *, prior: float = DEFAULT_PRIOR, scale: float = ELO_SCALE,
                center: float = ELO_CENTER, confidence: float = DEFAULT_CONFIDENCE) -> list[Rating]:
    """Bradley-Terry leaderboard for `votes` (rows of (model_a, model_b, outcome) or mappings with those keys).

    Returns one Rating per model that appears in a vote, sorted by rating (highest first), then name. The
    ratings average `center`; ci_low/ci_high bound the `confidence` (default 95%) interval of each rating from
    the inverse Hessian. No votes gives []. DataError names the index of the first malformed vote; ConfigError
    flags a bad prior/scale/confidence."""
    _check_settings(prior, scale, confidence)
    tally = _tally(votes)
    if not tally.names:
        return []
    games, first_score = _scores(tally.counts)
    theta, hessian = _fit(len(tally.names), tally.first, tally.second, games, first_score, float(prior))
    spread = scale * np.sqrt(np.clip(np.diag(_centred_covariance(hessian)), 0.0, None))
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    ratings = _display(theta, scale, center)
    counts = _per_model_counts(tally)
    rows = [
        Rating(name=name, rating=float(ratings[i]), ci_low=float(ratings[i] - z * spread[i]),
               ci_high=float(ratings[i] + z * spread[i]), games=int(counts[i, 0]), wins=int(counts[i, 1]),
               losses=int(counts[i, 2]), ties=int(counts[i, 3]), both_bad=int(counts[i, 4]))
        for i, name in enumerate(tally.names)
    ]
    return _sorted_rows(rows)


def bootstrap_intervals(votes: Iterable[Any], rounds: int = 200, seed: int = 0, *, prior: float = DEFAULT_PRIOR,
                        scale: float = ELO_SCALE, center: float = ELO_CENTER,
                        confidence: float = DEFAULT_CONFIDENCE) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals: {model name: (low, high)} on the same display scale as `leaderboard`.

    Each round draws as many votes as there are, with replacement, from the tallied counts (a multinomial over
    (pair, outcome) cells listed in sorted order), so the result depends only on the multiset of votes and
    `seed`, never on their order. A model missing from a resampled round still gets a rating: the prior holds it
    near the mean. Cost: `rounds` small Newton fits (milliseconds each for tens of models)."""
    _check_settings(prior, scale, confidence)
    if not isinstance(rounds, int) or rounds < 2:
        raise ConfigError(f"arena ratings: bootstrap rounds must be an integer >= 2, got {rounds!r}")
    tally = _tally(votes)
    if not tally.names:
        return {}
    cells = tally.counts.reshape(-1)
    total = int(cells.sum())
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, len(tally.names)))
    for r in range(rounds):
        counts = rng.multinomial(total, cells / total).reshape(tally.counts.shape)
        games, first_score = _scores(counts)
        theta, _ = _fit(len(tally.names), tally.first, tally.second, games, first_score, float(prior))
        samples[r] = _display(theta, scale, center)
    tail = (1.0 - confidence) / 2.0
    low = np.quantile(samples, tail, axis=0)
    high = np.quantile(samples, 1.0 - tail, axis=0)
    return {name: (float(low[i]), float(high[i])) for i, name in enumerate(tally.names)}


def to_json(ratings: Iterable[Rating]) -> list[dict]:
    """Plain dicts for the HTTP layer: keys name, rating, ci_low, ci_high, games, wins, losses, ties, both_bad."""
    return [asdict(row) for row in ratings]
