#!/usr/bin/env python3
"""Derives the polynomial of moe/gelu.cuh's gelu_fast and checks the fast GELU forms.

log2 Φ(−a) on [0, 5.5] by a degree-5 polynomial in a, minimising the largest absolute error of
Φ(−a) = 2^p(a) (Lawson's iteration: weighted least squares whose weights grow where the error is
largest, converging on the minimax fit). It then evaluates the kernels' arithmetic in float32 —
coefficients rounded to float, every fma rounded once — and prints the largest errors against exact
erf on |x| ≤ 7 of gelu_fast and of Abramowitz & Stegun 7.1.26's gelu and gelu' (the forms of
gelu_and_grad_fast and gelu_grad_fast). Needs mpmath; takes a minute.
    python3 scripts/fit_normal_tail.py
"""
import struct

import mpmath as mp

mp.mp.dps = 30
END, DEGREE, POINTS = 5.5, 5, 400


def tail(a):  # Φ(−a)
    return mp.erfc(a / mp.sqrt(2)) / 2


def fit():
    xs = [END * (1 - mp.cos(mp.pi * (i + 0.5) / POINTS)) / 2 for i in range(POINTS)]
    target = [mp.log(tail(a), 2) for a in xs]
    scale = [tail(a) * mp.log(2) for a in xs]  # d Φ / d log2 Φ: Φ's error per unit error of p
    lam, best = [mp.mpf(1) / POINTS] * POINTS, None
    for _ in range(60):
        ata, atb = mp.matrix(DEGREE + 1, DEGREE + 1), mp.matrix(DEGREE + 1, 1)
        for a, t, s, l in zip(xs, target, scale, lam):
            w, powers = s * s * l, [a**j for j in range(DEGREE + 1)]
            for j in range(DEGREE + 1):
                atb[j] += w * powers[j] * t
                for k in range(DEGREE + 1):
                    ata[j, k] += w * powers[j] * powers[k]
        c = mp.lu_solve(ata, atb)
        err = [abs(s * (mp.polyval(list(reversed(c)), a) - t)) for a, t, s in zip(xs, target, scale)]
        if best is None or max(err) < best[0]:
            best = (max(err), [c[j] for j in range(DEGREE + 1)])
        total = sum(l * e for l, e in zip(lam, err))
        lam = [l * e / total for l, e in zip(lam, err)]
    return best


def f32(x):
    return struct.unpack("f", struct.pack("f", float(x)))[0]


def fma(a, b, c):  # one rounding, as the GPU's fmaf
    return f32(mp.mpf(a) * mp.mpf(b) + mp.mpf(c))


def ex2(x):
    return f32(mp.mpf(2) ** mp.mpf(x))


def polynomial_gelu(coef):  # gelu_fast
    def gelu(x):
        a = f32(min(abs(x), END))
        p = coef[-1]
        for c in reversed(coef[:-1]):
            p = fma(p, a, c)
        return fma(-a, ex2(p), max(x, 0.0))
    return gelu


def abramowitz_stegun(x):  # gelu_and_grad_fast: (gelu, gelu')
    e = ex2(f32(f32(x * x) * f32(-0.72134752044448170)))
    t = f32(1 / mp.mpf(fma(f32(0.23164190), abs(x), 1.0)))
    p = f32(0.5307027145)
    for c in (-0.7265760135, 0.7107068705, -0.142248368, 0.127414796):
        p = fma(p, t, f32(c))
    tail_ = f32(f32(e * t) * p)
    cdf = f32(1 - tail_) if x >= 0 else tail_
    return f32(x * cdf), fma(f32(x * f32(0.3989422804014327)), e, cdf)


def worst_errors(form):  # form(x) = (gelu, gelu' or None)
    gelu_abs = grad_abs = gelu_rel = 0
    for i in range(-28000, 28001):
        x = f32(i * 0.00025 * (1 + (i % 7) * 1e-4))
        X = mp.mpf(x)
        cdf = (1 + mp.erf(X / mp.sqrt(2))) / 2
        gelu, grad = X * cdf, cdf + X * mp.exp(-X * X / 2) / mp.sqrt(2 * mp.pi)
        g, d = form(x)
        gelu_abs = max(gelu_abs, abs(g - gelu))
        if d is not None:
            grad_abs = max(grad_abs, abs(d - grad))
        if abs(gelu) > 1e-3:
            gelu_rel = max(gelu_rel, abs(g - gelu) / abs(gelu))
    return gelu_abs, gelu_rel, grad_abs


if __name__ == "__main__":
    err, coef = fit()
    coef = [f32(c) for c in coef]
    print("largest |Φ(−a) − 2^p(a)| on [0, %g], degree %d: %.3g" % (END, DEGREE, err))
    print("coefficients, a^0 .. a^%d:" % DEGREE, ", ".join("%.9g" % c for c in coef))
    gelu = polynomial_gelu(coef)
    print("gelu_fast (this polynomial), float32, |x| <= 7: gelu abs %.3g, rel (|gelu| > 1e-3) %.3g"
          % worst_errors(lambda x: (gelu(x), None))[:2])
    print("gelu_and_grad_fast (Abramowitz & Stegun 7.1.26), float32, |x| <= 7: gelu abs %.3g, "
          "rel (|gelu| > 1e-3) %.3g; gelu' abs %.3g" % worst_errors(abramowitz_stegun))
