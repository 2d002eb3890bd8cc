"""The challenge's significance rule (its README; docs/TECHNIQUES.md, "Record folders and significance"):
a new record must improve val_loss by at least 0.005 nats with p < 0.01. Tested here as a one-sided
Welch t-test of H0: mean_base - mean_new <= 0.005 against H1: mean_base - mean_new > 0.005 across seeds.

The Student t CDF uses scipy when it is installed, else our own: the regularized incomplete beta
function by Lentz's continued fraction (Numerical Recipes §6.4), which the tests check against
known values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MIN_IMPROVEMENT_NATS = 0.005
P_THRESHOLD = 0.01


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc_reg(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc_reg needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf_own(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df > 0 degrees of freedom (no scipy)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc_reg(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_cdf(t: float, df: float) -> float:
    try:
        from scipy.stats import t as student_t
    except ImportError:
        return t_cdf_own(t, df)
    return float(student_t.cdf(t, df))


def _mean_var(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0)


@dataclass
class Comparison:
    new: list
    base: list
    mean_new: float
    mean_base: float
    var_new: float
    var_base: float
    delta: float       # mean_base - mean_new (nats; > 0 = the new runs are better)
    t: float
    df: float
    p: float
    significant: bool
    note: str = ""
    margin: float = MIN_IMPROVEMENT_NATS  # the improvement H1 asks for (nats)

    def lines(self) -> list[str]:
        f = lambda xs: "[" + ", ".join(f"{x:.8f}" for x in xs) + "]"  # noqa: E731
        return [
            f"new  val_loss per seed: {f(self.new)}  n={len(self.new)} mean={self.mean_new:.8f} "
            f"std={math.sqrt(self.var_new):.8f}",
            f"base val_loss per seed: {f(self.base)}  n={len(self.base)} mean={self.mean_base:.8f} "
            f"std={math.sqrt(self.var_base):.8f}",
            f"improvement (base - new): {self.delta:.8f} nats (required >= {self.margin:g})",
            f"one-sided Welch t-test, H1: improvement > {self.margin:g}: t={self.t:.4f} "
            f"df={self.df:.4f} p={self.p:.3g} (required < {P_THRESHOLD})" + (f"  [{self.note}]" if self.note else ""),
            f"significant: {'yes' if self.significant else 'no'}",
        ]


def compare_losses(new: list[float], base: list[float], margin: float = MIN_IMPROVEMENT_NATS,
                   cdf=t_cdf) -> Comparison:
    """Welch's t for (mean_base - mean_new - margin); a side with one seed contributes no variance
    (then it is a one-sample test against that value, df = n_other - 1)."""
    if not new or not base:
        raise ValueError("both sides need at least one val_loss")
    if len(new) < 2 and len(base) < 2:
        raise ValueError("at least one side needs two or more seeds for a t-test")
    mn, vn = _mean_var(new)
    mb, vb = _mean_var(base)
    delta = mb - mn
    sn, sb = vn / len(new), vb / len(base)
    se2 = sn + sb
    note = "one seed on one side: one-sample test" if min(len(new), len(base)) == 1 else ""
    if se2 == 0:
        t = math.inf if delta > margin else -math.inf
        df = float(max(len(new), len(base)) - 1)
        p = 0.0 if delta > margin else 1.0
        note = "zero variance"
    else:
        t = (delta - margin) / math.sqrt(se2)
        terms = [(s * s) / (n - 1) for s, n in ((sn, len(new)), (sb, len(base))) if n > 1]
        df = se2 * se2 / sum(terms)
        p = 1.0 - cdf(t, df)
    return Comparison(list(new), list(base), mn, mb, vn, vb, delta, t, df, p,
                      delta >= margin and p < P_THRESHOLD, note, margin)


@dataclass
class Screen:
    """One run of a variant against n ≥ 2 seeds of the base: where does it fall in their spread?"""
    value: float
    base: list
    mean_base: float
    std_base: float
    delta: float   # mean_base - value (nats; > 0 = the variant's run is better)
    t: float
    df: int
    p_better: float  # one-sided: the variant better than the base

    @property
    def p_worse(self) -> float:  # one-sided: the variant worse
        return 1.0 - self.p_better

    def line(self) -> str:
        return (f"one run {self.value:.8f} vs base n={len(self.base)} mean={self.mean_base:.8f} "
                f"std={self.std_base:.8f}: improvement {self.delta:+.8f} nats, prediction t={self.t:.4f} "
                f"df={self.df}, p(better)={self.p_better:.3g}, p(worse)={self.p_worse:.3g}")


def screen_one_run(value: float, base: list[float], cdf=t_cdf) -> Screen:
    """A screen for a variant run on one seed. The base's seeds estimate the seed-to-seed spread σ,
    and one run of the variant carries that spread too, so the difference from the base's mean has
    variance σ²(1 + 1/n): t = (mean_base − value) / (s·√(1 + 1/n)) with n − 1 degrees of freedom
    (the prediction interval for one new draw; it assumes the variant's seed spread equals the base's).
    compare_losses' one-seed case instead treats the single value as exact, which fits a published
    record but overstates a one-seed screen."""
    if len(base) < 2:
        raise ValueError("the base needs two or more seeds to estimate the seed spread")
    mb, vb = _mean_var(base)
    delta = mb - value
    n = len(base)
    if vb == 0:
        raise ValueError("the base's seeds are identical: no spread to screen against")
    t = delta / math.sqrt(vb * (1.0 + 1.0 / n))
    return Screen(value, list(base), mb, math.sqrt(vb), delta, t, n - 1, 1.0 - cdf(t, n - 1))
