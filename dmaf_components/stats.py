# Copyright (c) DMAF-Net bundle contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Paired comparisons of two training settings whose unit of replication is the seed.

A study trains each setting once per seed and scores every run on the same test cases, so a paired difference is a
``(seeds, cases)`` array ``d[s, c] = delta + a_s + b_c + e_sc``: ``a_s`` is what one training run draws (data order,
initialisation), ``b_c`` how much more one case gains than another, ``e_sc`` the rest. The question a user asks
("does the setting help on data like this?") is about ``delta``, the mean over new seeds and new cases, so both
``a`` and ``b`` are sources of error. With 3-10 seeds the seed term is usually the larger one, and it has only
``seeds - 1`` degrees of freedom however many cases there are: resampling cases as if they were many independent
replicates (the percentile bootstrap :func:`paired_bootstrap`) gives an interval about as wide as the range of the
seeds and covers the effect far less often than it claims (``tests/test_stats.py`` simulates it).

:func:`seed_interval` is the interval this project reports:

- two-way ANOVA mean squares of the ``(seeds, cases)`` table: ``MS_seed``, ``MS_case``, ``MS_err``;
- variance of the grand mean ``(MS_seed + max(MS_case - MS_err, 0)) / (S C)``: the variance of the per-seed means
  over ``S`` (a t-interval over seeds) plus the case component ``sigma_b^2 / C``, which the seed means share and so
  cannot show;
- Student's t with ``S - 1`` degrees of freedom (the seed term's; conservative when the case term dominates).

It is never narrower than the t-interval over the per-seed mean differences. :func:`sign_flip_p` is the exact
two-sided randomisation test over the seeds (its smallest p is ``2 / 2^S``: 0.25 with 3 seeds, 0.0625 with 5, 0.002
with 10), :func:`detectable_effect` the smallest effect the design detects with 80 % power, and
:func:`seeds_needed` how many seeds would detect a given effect.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np
from scipy import stats as _st

__all__ = [
    "PairedInterval",
    "seed_interval",
    "sign_flip_p",
    "detectable_effect",
    "seeds_needed",
    "paired_bootstrap",
]


class PairedInterval(NamedTuple):
    """A paired difference over seeds (and cases).

    Attributes:
        mean: mean difference over every (seed, case) cell.
        low: lower end of the interval.
        high: upper end of the interval.
        seeds: number of seeds (with at least one defined case).
        p: exact two-sided sign-flip p-value over the per-seed means.
        se: standard error of ``mean`` (seed and case components).
        se_seed: the seed part of ``se`` for one seed (``se = sqrt(se_seed^2 / seeds + se_case^2)``).
        se_case: the case part of ``se``, which more seeds do not reduce.
        detectable: smallest true effect this design detects with 80 % power at the interval's level.
        seeds_needed: seeds needed to detect an effect of ``mean`` with 80 % power (inf: the case part alone is too
            large, more test cases are needed; 0 when ``mean`` is 0).
    """

    mean: float
    low: float
    high: float
    seeds: int
    p: float
    se: float
    se_seed: float
    se_case: float
    detectable: float
    seeds_needed: float


def _components(d: np.ndarray) -> tuple[float, float, float]:
    """``(mean, var_seed_mean, var_case_mean)`` of a ``(S, C)`` table: the variance of one seed's mean (its own draw
    and its cases' residuals) and the case component of the grand mean's variance (``sigma_b^2 / C``). Cells that
    are NaN are left out: each seed's and case's mean uses its defined cells."""
    s_n, c_n = d.shape
    grand = float(np.nanmean(d))
    seed_means = np.nanmean(d, axis=1)
    if c_n == 1:
        return grand, float(np.var(seed_means, ddof=1)) if s_n > 1 else math.nan, 0.0
    case_means = np.nanmean(d, axis=0)
    ms_seed = c_n * float(np.var(seed_means, ddof=1)) if s_n > 1 else math.nan
    if s_n == 1:
        return grand, math.nan, 0.0
    ms_case = s_n * float(np.nanvar(case_means, ddof=1))
    resid = d - seed_means[:, None] - case_means[None, :] + grand
    n_def = int(np.isfinite(resid).sum())
    dof = max(n_def - s_n - c_n + 1, 1)
    ms_err = float(np.nansum(resid**2)) / dof
    var_seed_mean = ms_seed / c_n  # variance of one seed's mean over the C cases
    var_case_mean = max(ms_case - ms_err, 0.0) / (s_n * c_n)
    return grand, var_seed_mean, var_case_mean


def sign_flip_p(per_seed: np.ndarray, max_exact: int = 16, n_random: int = 65536, seed: int = 0) -> float:
    """Exact two-sided sign-flip (randomisation) p-value of the mean of per-seed differences being 0.

    Under "no effect" each seed's difference is as likely positive as negative; the p-value is the share of the
    ``2^S`` sign patterns whose mean is at least as far from 0 as the observed one (the observed pattern included).

    Args:
        per_seed: ``(S,)`` one mean difference per seed.
        max_exact: up to this many seeds every pattern is enumerated; above it ``n_random`` random patterns.
        n_random: patterns drawn when ``S > max_exact``.
        seed: seed of those draws.

    Returns:
        p in (0, 1]; NaN with no seed.
    """
    x = np.asarray(per_seed, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan
    observed = abs(x.mean())
    if len(x) <= max_exact:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(x))))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_random, len(x)))
        signs[0] = 1.0
    flipped = np.abs(signs @ x) / len(x)
    return float(np.mean(flipped >= observed - 1e-12 * max(1.0, observed)))


def _power(effect: float, se_seed: float, se_case: float, seeds: int, level: float) -> float:
    """Power of the two-sided test of :func:`seed_interval` at a true ``effect`` with ``seeds`` seeds."""
    if seeds < 2:
        return 0.0
    se = math.sqrt(se_seed**2 / seeds + se_case**2)
    if se == 0.0:
        return 1.0 if effect != 0 else 0.0
    df = seeds - 1
    crit = _st.t.ppf(0.5 + level / 2.0, df)
    nc = abs(effect) / se
    return float(1.0 - _st.nct.cdf(crit, df, nc) + _st.nct.cdf(-crit, df, nc))


def detectable_effect(se_seed: float, se_case: float, seeds: int, level: float = 0.95, power: float = 0.8) -> float:
    """Smallest true effect that ``seeds`` seeds detect with probability ``power`` (two-sided, at ``level``).

    Args:
        se_seed: standard deviation of one seed's mean difference.
        se_case: the case component of the standard error (see :class:`PairedInterval`).
        seeds: number of seeds.
        level: confidence level of the test's interval.
        power: the detection probability.

    Returns:
        the effect, in the units of the differences; inf with fewer than 2 seeds or undefined spreads.
    """
    if seeds < 2 or not (math.isfinite(se_seed) and math.isfinite(se_case)):
        return math.inf
    se = math.sqrt(se_seed**2 / seeds + se_case**2)
    if se == 0.0:
        return 0.0
    lo, hi = 0.0, se
    while _power(hi, se_seed, se_case, seeds, level) < power:
        hi *= 2.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if _power(mid, se_seed, se_case, seeds, level) < power else (lo, mid)
    return hi


def seeds_needed(
    effect: float, se_seed: float, se_case: float, level: float = 0.95, power: float = 0.8, max_seeds: int = 1000
) -> float:
    """Fewest seeds whose test detects a true ``effect`` with probability ``power`` (two-sided, at ``level``).

    Returns:
        the number of seeds (at least 2); ``inf`` when no number up to ``max_seeds`` does (the case component alone
        is too large: more test cases, not more seeds); 0 for a zero effect (nothing to detect); NaN with undefined
        spreads.
    """
    if not (math.isfinite(se_seed) and math.isfinite(se_case) and math.isfinite(effect)):
        return math.nan
    if effect == 0.0:
        return 0.0
    if _power(effect, se_seed, se_case, max_seeds, level) < power:
        return math.inf
    lo, hi = 1, 2  # power(lo) < power <= power(hi) once the doubling stops; power grows with the seeds
    while _power(effect, se_seed, se_case, hi, level) < power:
        lo, hi = hi, min(2 * hi, max_seeds)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _power(effect, se_seed, se_case, mid, level) < power else (lo, mid)
    return float(hi)


def seed_interval(diffs: np.ndarray, level: float = 0.95, power_analysis: bool = True) -> PairedInterval:
    """The paired difference of two settings with an interval whose unit of replication is the seed.

    Args:
        diffs: ``(seeds, cases)`` setting minus reference, paired by seed and case (NaN cells are left out); a 1-D
            array is one value per seed.
        level: coverage of the interval (e.g. 0.95).
        power_analysis: compute ``detectable`` and ``seeds_needed`` (NaN when False: a simulation that needs only
            the interval skips their root searches).

    Returns:
        :class:`PairedInterval`. With one seed the interval, ``p`` and the spreads are NaN: one training run cannot
        say how much another would differ.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim == 1:
        d = d[:, None]
    d = d[np.isfinite(d).any(axis=1)]
    d = d[:, np.isfinite(d).any(axis=0)] if d.size else d
    s_n = d.shape[0]
    if s_n == 0:
        nan = math.nan
        return PairedInterval(nan, nan, nan, 0, nan, nan, nan, nan, math.inf, nan)
    mean, var_seed, var_case = _components(d)
    p = sign_flip_p(np.nanmean(d, axis=1))
    if s_n < 2:
        nan = math.nan
        return PairedInterval(mean, nan, nan, s_n, nan, nan, nan, nan, math.inf, nan)
    se_seed, se_case = math.sqrt(var_seed), math.sqrt(var_case)
    se = math.sqrt(var_seed / s_n + var_case)
    half = float(_st.t.ppf(0.5 + level / 2.0, s_n - 1)) * se
    if not power_analysis:
        return PairedInterval(mean, mean - half, mean + half, s_n, p, se, se_seed, se_case, math.nan, math.nan)
    return PairedInterval(
        mean,
        mean - half,
        mean + half,
        s_n,
        p,
        se,
        se_seed,
        se_case,
        detectable_effect(se_seed, se_case, s_n, level),
        seeds_needed(mean, se_seed, se_case, level),
    )


def paired_bootstrap(
    diffs: np.ndarray, n_boot: int = 10000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of paired differences and its percentile bootstrap interval, resampling seeds and test cases.

    Kept as a second, labelled column: with few seeds it treats the cases as independent replicates and is too
    narrow (with 3 seeds its interval is about the range of the seeds; it covers a true effect far less often than
    ``level``). Use :func:`seed_interval` for claims.

    Args:
        diffs: ``(seeds, cases)`` setting minus reference (NaN cells are left out of each mean).
        n_boot: bootstrap replicates.
        level: coverage the interval is meant to have.
        seed: seed of the resampling.

    Returns:
        ``(mean, low, high)``.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim == 1:
        d = d[:, None]
    s, c = d.shape
    rng = np.random.default_rng(seed)
    si = rng.integers(0, s, size=(n_boot, s))
    ci = rng.integers(0, c, size=(n_boot, c))
    cells = d[si[:, :, None], ci[:, None, :]]  # (n_boot, s, c)
    means = np.nanmean(cells.reshape(n_boot, -1), axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.nanquantile(means, [alpha, 1.0 - alpha])
    return float(np.nanmean(d)), float(low), float(high)
