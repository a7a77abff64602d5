"""Probe (issue 18): does Newton–GMRES on the tangent stationarity equations beat Anderson?

Not a finished solver: an exploratory measurement, kept so that its figures can be
reproduced.  On Fashion-MNIST halves (a seeded 10,000-row subset of the training set,
rank 64, all other options the library's defaults) it

1. runs the default fit for ``--warm-iters`` iterations (Anderson) and, separately, for
   ``--anderson-iters`` iterations as the baseline, printing its certificate every 10;
2. from the warm iterate solves F(W) = P_T(C(W)) − ρW = 0 on the rank-r manifold by
   inexact Newton: GMRES (at most ``--krylov`` products, forcing term 0.05) on the
   Jacobian, each Jacobian–vector product a finite difference (F(R_W(hξ)) − F(W))/h
   projected onto T_W (R_W: rank-r truncation of W + hξ, h = ``--h`` · ‖W‖_F), then a
   step halved while the certificate (``fixed_point_residual``, cosine) does not fall, down to
   1/16, which is taken whatever its certificate (a probe, not a safeguarded solver);
   ``--precondition`` applies the inverse of the analytic part of the Jacobian (C held
   fixed: −ρI plus the manifold's curvature term, no pass over the rows) by an inner GMRES.

Every evaluation of C is counted; compare evaluations, not outer steps.  F is zero exactly
where the certificate is (for cosine similarity C(cW) = C(W)/c fixes the scale at c² = λ/ρ).

Usage::

    python benchmarks/probe_newton_krylov.py                          # float32, h 1e-3
    python benchmarks/probe_newton_krylov.py --dtype float64 --h 1e-6
    python benchmarks/probe_newton_krylov.py --precondition
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import unicon_dist as ud
from unicon_dist.data.datasets import load_fashion_mnist_halves
from unicon_dist.math.closed_form import fixed_point_residual
from unicon_dist.solver import fixed_point


def tangent(U, V, Z):
    """P_T(Z) at W = U S Vᵀ."""
    PU = U @ (U.T @ Z)
    return PU + (Z @ V) @ V.T - (PU @ V) @ V.T


def truncate(W, r):
    """(U, s, V) of the rank-r truncation of W."""
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r], s[:r], Vh[:r].T


def gmres(op, b, k_max, tol, precondition=None):
    """Flexible GMRES (right preconditioning by any callable) from x = 0; (x, relative residual, products)."""
    nb = float(torch.linalg.norm(b))
    Q, Z, H = [b / nb], [], np.zeros((k_max + 1, k_max))
    for k in range(k_max):
        Z.append(Q[k] if precondition is None else precondition(Q[k]))
        w = op(Z[k])
        for j in range(k + 1):  # modified Gram–Schmidt
            H[j, k] = float((Q[j] * w).sum())
            w = w - H[j, k] * Q[j]
        H[k + 1, k] = float(torch.linalg.norm(w))
        Q.append(w / H[k + 1, k])
        e1 = np.zeros(k + 2)
        e1[0] = nb
        y = np.linalg.lstsq(H[:k + 2, :k + 1], e1, rcond=None)[0]
        rel = float(np.linalg.norm(H[:k + 2, :k + 1] @ y - e1)) / nb
        if rel < tol:
            break
    return sum(float(y[j]) * Z[j] for j in range(len(y))), rel, k + 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--h", type=float, default=1e-3)
    ap.add_argument("--krylov", type=int, default=30)
    ap.add_argument("--outer", type=int, default=5)
    ap.add_argument("--warm-iters", type=int, default=5)
    ap.add_argument("--anderson-iters", type=int, default=120)
    ap.add_argument("--precondition", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    left, right, _ = load_fashion_mnist_halves("train")
    rows = np.random.default_rng(0).permutation(len(left))[:args.n]
    X, Y = left[rows], right[rows]
    r, dt = args.rank, getattr(torch, args.dtype)

    if args.anderson_iters:
        base = ud.UniCon(rank=r, dtype=args.dtype, max_iter=args.anderson_iters).fit(X, Y)
        res = [h["residual"] for h in base.history_]
        print(f"anderson: certificate after 10, 20, ... evaluations: {[f'{x:.2e}' for x in res[9::10]]}, "
              f"lowest {min(res):.2e}", flush=True)

    captured = {}
    solve = fixed_point.solve

    def capture(make_operator, shape, options, device, **kw):
        captured.update(make_operator=make_operator, rho=float(options.rho))
        return solve(make_operator, shape, options, device, **kw)

    fixed_point.solve = capture
    try:
        warm = ud.UniCon(rank=r, dtype=args.dtype, max_iter=args.warm_iters).fit(X, Y)
    finally:
        fixed_point.solve = solve
    make_operator, rho = captured["make_operator"], captured["rho"]
    evaluations = [0]

    def evaluate(W):
        """The point (rank-r W, U, V), F(W), C(W) and the certificate, at balanced factors."""
        U, s, V = truncate(W, r)
        F1, F2 = torch.sqrt(s)[:, None] * U.T, torch.sqrt(s)[:, None] * V.T
        op = make_operator(F1.to(dt), F2.to(dt))
        C = op.materialize().to(torch.float64)
        op.release()
        evaluations[0] += 1
        W = (U * s) @ V.T
        F = tangent(U, V, C) - rho * W
        return W, U, V, F, C, fixed_point_residual(C, F1, F2, rho, "sqrt", "cosine")

    W, U, V, F, C, cert = evaluate(torch.as_tensor(warm.W_, dtype=torch.float64))
    print(f"newton from Anderson iterate {args.warm_iters}: certificate {cert:.2e}", flush=True)
    t0 = time.perf_counter()
    for outer in range(args.outer):
        h = args.h * float(torch.linalg.norm(W))

        def jacobian(xi):
            Up, sp, Vp = truncate(W + h * xi, r)
            return tangent(U, V, (evaluate((Up * sp) @ Vp.T)[3] - F) / h)

        def analytic(xi):  # C held fixed: no pass over the rows
            Up, sp, Vp = truncate(W + h * xi, r)
            return tangent(U, V, (tangent(Up, Vp, C) - rho * (Up * sp) @ Vp.T - F) / h)

        inverse = (lambda v: gmres(analytic, v, 40, 1e-4)[0]) if args.precondition else None
        xi, linear, products = gmres(jacobian, -F, args.krylov, 0.05, inverse)
        alpha = 1.0
        while True:
            Ut, st, Vt = truncate(W + alpha * xi, r)
            trial = evaluate((Ut * st) @ Vt.T)
            if trial[5] < cert or alpha < 0.1:
                break
            alpha /= 2
        print(f"outer {outer}: {products} products, linear residual {linear:.2e}, step {alpha}, "
              f"certificate {cert:.2e} -> {trial[5]:.2e}, evaluations {evaluations[0]}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        W, U, V, F, C, cert = trial
        if cert <= 1e-5:
            break


if __name__ == "__main__":
    main()
