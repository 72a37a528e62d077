"""Privacy accounting helpers on top of Opacus' accountants (no Lightning import).

An accountant's *history* is Opacus' run-length list ``[(noise_multiplier, sample_rate, steps)]``
of Poisson-subsampled Gaussian mechanisms. These helpers compute epsilon from a history
(:func:`compute_epsilon`), the noise multiplier that reaches a target epsilon after a number of
steps (:func:`noise_multiplier_for`) and the number of further steps that keep epsilon within a
target (:func:`steps_within_budget`).

``prv`` (Gopi et al. 2021, Opacus' default) discretizes the privacy-loss distribution on a grid
whose size grows like ``L * sqrt(steps) / eps_error`` (``L`` is an RDP bound on the loss). For
weak privacy (large epsilon, e.g. sigma 0.3 over hundreds of steps) Opacus' fixed
``eps_error=0.01`` asks for grids of millions to billions of points (``numpy`` then fails to
allocate tens of GiB). :func:`compute_epsilon` therefore widens ``eps_error`` just enough to keep
the grid at ``max_prv_grid`` points. The result stays an *upper bound* on epsilon (the PRV
accountant returns its estimate plus the error); below that size it is exactly
``PRVAccountant.get_epsilon(delta)``.

Opacus is imported inside the functions, so importing this module does not need it.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "ACCOUNTANTS",
    "compute_epsilon",
    "extend_history",
    "noise_multiplier_for",
    "steps_within_budget",
]

#: Accounting mechanisms Opacus provides (``opacus.accountants.create_accountant``).
ACCOUNTANTS = ("prv", "rdp", "gdp")

History = list[tuple[float, float, int]]


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}; 'prv' (the Opacus default) is the tightest"
        )


def _normalize(history: Iterable[Sequence[float]]) -> History:
    out: History = []
    for entry in history:
        if len(entry) != 3:
            raise ValueError(f"history entries must be (noise_multiplier, sample_rate, steps), got {entry!r}")
        sigma, q, steps = float(entry[0]), float(entry[1]), int(entry[2])
        if steps < 0 or sigma < 0 or not 0 < q <= 1:
            raise ValueError(f"invalid history entry (noise_multiplier, sample_rate, steps) = {tuple(entry)!r}")
        if steps == 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


def extend_history(history: Iterable[Sequence[float]], noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """Append ``steps`` steps of ``(noise_multiplier, sample_rate)``, merging equal neighbours as Opacus does.

    Example:
        >>> extend_history([(1.0, 0.1, 5)], 1.0, 0.1, 3)
        [(1.0, 0.1, 8)]
        >>> extend_history([(1.0, 0.1, 5)], 2.0, 0.1, 1)
        [(1.0, 0.1, 5), (2.0, 0.1, 1)]
    """
    return _normalize([*history, (noise_multiplier, sample_rate, steps)])


@functools.lru_cache(maxsize=256)
def _rdp_one_step(sample_rate: float, noise_multiplier: float) -> Any:
    """RDP of one Poisson-subsampled Gaussian step at Opacus' default orders (cached: the slow part)."""
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp
    from opacus.accountants.rdp import RDPAccountant

    vec = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    vec = np.asarray(vec, dtype=float)
    vec.setflags(write=False)
    return vec


def _rdp_epsilon(history: History, delta: float) -> float:
    # == RDPAccountant(history).get_epsilon(delta): sum of per-segment RDP, then Balle et al.'s conversion
    from opacus.accountants.analysis.rdp import get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    rdp = sum([_rdp_one_step(q, sigma) * steps for sigma, q, steps in history])
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def _safe_domain_size(history: History, eps_error: float, delta_error: float) -> float:
    # == opacus.accountants.analysis.prv.compute_safe_domain_size, with the cached RDP vectors
    total = sum(steps for _, _, steps in history)
    L_max = _rdp_epsilon(history, delta_error / 4)
    for sigma, q, _ in history:
        L_max = max(L_max, _rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total)))
    return max(L_max, eps_error) + 3


def _prv_epsilon(history: History, delta: float, max_grid: int) -> float:
    import numpy as np
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        discretize,
    )

    # Same steps as opacus.accountants.PRVAccountant.get_epsilon(delta) (eps_error=0.01,
    # delta_error=delta/1000), except that eps_error grows when the grid would exceed max_grid.
    eps_error, delta_error = 0.01, delta / 1000
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    counts = [steps for _, _, steps in history]
    L = _safe_domain_size(history, eps_error, delta_error)
    root = np.sqrt(sum(counts) * np.log(12 / delta_error) / 2)
    grid = 2 * L * root / eps_error
    if grid > max_grid:
        eps_error = eps_error * grid / max_grid
        L = max(L - 3, eps_error) + 3  # the safe domain is max(L_max, eps_error) + 3
    mesh = eps_error / root
    domain = Domain.create_aligned(-L, L, mesh)
    tprvs = [TruncatedPrivacyRandomVariable(prv, domain.t_min, domain.t_max) for prv in prvs]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        dprv = compose_heterogeneous(dprvs=[discretize(t, domain) for t in tprvs], num_self_compositions=counts)
        _, _, eps_upper = dprv.compute_epsilon(delta, delta_error, eps_error)
    eps_upper = float(eps_upper)
    if not math.isfinite(eps_upper):
        # The PRV numerics overflow for very weak privacy (epsilon in the hundreds and more).
        # The RDP bound is also a valid upper bound; report it rather than inf or nan.
        rdp = _rdp_epsilon(history, delta)
        warnings.warn(
            f"the PRV accountant overflowed for history {history}; reporting the RDP upper bound epsilon={rdp:.4g} "
            "instead (privacy this weak is not meaningful either way)",
            RuntimeWarning,
            stacklevel=3,
        )
        return rdp
    return eps_upper


def compute_epsilon(
    history: Iterable[Sequence[float]], delta: float, accountant: str = "prv", max_prv_grid: int = 1_000_000
) -> float:
    """Epsilon at ``delta`` after the mechanisms in ``history``.

    ``0.0`` for an empty history, ``inf`` when any step had ``noise_multiplier == 0`` (no
    privacy). Otherwise Opacus' accountant of that name (``prv`` with the grid cap described in
    the module docstring).

    Args:
        history: ``[(noise_multiplier, sample_rate, steps), ...]``.
        delta: the delta of the (epsilon, delta) guarantee, in ``(0, 1)``.
        accountant: ``"prv"``, ``"rdp"`` or ``"gdp"``.
        max_prv_grid: largest PRV discretization grid (points) before ``eps_error`` is widened.

    Returns:
        Epsilon (a float; ``inf`` without noise).

    Example:
        >>> round(compute_epsilon([(1.0, 0.01, 1000)], 1e-5, "rdp"), 3)
        2.101
        >>> compute_epsilon([(0.0, 0.01, 10)], 1e-5)
        inf
    """
    _check_accountant(accountant)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    hist = _normalize(history)
    if not hist:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in hist):
        return math.inf
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest) alpha")
        warnings.filterwarnings("ignore", message="GDP accounting is experimental")
        if accountant == "prv":
            return _prv_epsilon(hist, delta, max_prv_grid)
        if accountant == "rdp":
            return _rdp_epsilon(hist, delta)
        from opacus.accountants import create_accountant

        if accountant == "gdp" and len(hist) > 1:
            raise ValueError(
                f"accountant='gdp' needs one constant (noise_multiplier, sample_rate), got history {hist}; "
                "use accountant='prv' or 'rdp'"
            )
        acc = create_accountant(mechanism=accountant)
        acc.history = list(hist)
        return float(acc.get_epsilon(delta))


def noise_multiplier_for(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv"
) -> float:
    """The noise multiplier that keeps epsilon <= ``target_epsilon`` after ``steps`` Poisson steps.

    The same search as Opacus' ``get_noise_multiplier`` (double sigma from 10 until epsilon is
    below the target, then bisect until it is within ``0.01`` below it; sigma above ``1e6``
    fails), computed with :func:`compute_epsilon` (which caches the RDP terms per sigma), so for
    ``prv`` and ``rdp`` the result equals Opacus'.

    Example:
        >>> sigma = noise_multiplier_for(2.0, 1e-5, 0.01, 1000, "rdp")
        >>> 0.5 < sigma < 2.0
        True
    """
    _check_accountant(accountant)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not 0 < target_epsilon < math.inf:
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")

    def eps(sigma: float) -> float:
        return compute_epsilon([(sigma, sample_rate, steps)], delta, accountant)

    eps_high, sigma_low, sigma_high = math.inf, 0.0, 10.0
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = eps(sigma_high)
        if sigma_high > 1e6:
            raise ValueError(
                f"target_epsilon={target_epsilon} at delta={delta:.3g} cannot be reached over {steps} steps at sample "
                f"rate {sample_rate:.4g} even with noise_multiplier > 1e6; raise target_epsilon, train fewer "
                "epochs or lower the batch size"
            )
    while target_epsilon - eps_high > 0.01:
        sigma = (sigma_low + sigma_high) / 2
        e = eps(sigma)
        if e < target_epsilon:
            sigma_high, eps_high = sigma, e
        else:
            sigma_low = sigma
    return float(sigma_high)


def steps_within_budget(
    target_epsilon: float,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    accountant: str = "prv",
    history: Iterable[Sequence[float]] = (),
    guess: int = 1,
    cap: int = 1 << 24,
) -> int:
    """The largest ``k`` with ``epsilon(history + k steps of (noise_multiplier, sample_rate)) <= target``.

    Epsilon grows with the number of steps, so this brackets ``k`` by doubling from ``guess``
    and then bisects (about ``2 log2(k)`` accountant calls). ``k`` is at most ``cap``.

    Args:
        target_epsilon: the budget.
        delta: delta of the guarantee.
        noise_multiplier: sigma of the future steps.
        sample_rate: q of the future steps.
        accountant: ``"prv"``, ``"rdp"`` or ``"gdp"``.
        history: steps already taken.
        guess: a first guess of ``k`` (e.g. the planned number of steps).
        cap: the largest ``k`` returned.

    Returns:
        ``k >= 0`` (0 when even the history alone is over the budget).

    Example:
        >>> k = steps_within_budget(2.0, 1e-5, 1.0, 0.01, "rdp", guess=500)
        >>> compute_epsilon([(1.0, 0.01, k)], 1e-5, "rdp") <= 2.0 < compute_epsilon([(1.0, 0.01, k + 1)], 1e-5, "rdp")
        True
    """
    hist = _normalize(history)

    def ok(k: int) -> bool:
        return compute_epsilon(extend_history(hist, noise_multiplier, sample_rate, k), delta, accountant) <= target_epsilon

    if not ok(0):
        return 0
    lo = 0
    hi = max(1, min(int(guess), cap))
    while ok(hi):  # invariant: ok(lo)
        lo = hi
        if hi >= cap:
            return cap
        hi = min(2 * hi, cap)
    while hi - lo > 1:  # ok(lo) and not ok(hi)
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
