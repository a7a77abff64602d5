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
   ``--precondition analytic`` applies the inverse of the analytic part of the Jacobian (C
   held fixed: −ρI plus the manifold's curvature term, no pass over the rows) by an inner
   GMRES of ``--inner`` products (relative tolerance ``--inner-tol``); ``--precondition kfac`` adds a Kronecker model of the data
   term, P_T·DC[ξ] ≈ −P_T(A_x ξ B_y + B_x ξ A_y)/(2τ) (A: second moments of the cosine-scaled
   feature rows, B: mean covariances of the other view's rows under each row's P or each
   column's P̄, from seeded batches of 1,024), with the analytic part in closed form (it
   differs from the finite difference by about 6 % on a random tangent vector, printed with
   ``--check-cf``; not resolved, so that variant's figures are a model's, not an exact one's).
3. ``--diagnose`` instead prints, at the warm iterate, Ritz values of the Jacobian, of the
   analytic part and of analytic + Kronecker model (Arnoldi with ``--krylov`` products from
   −F), and their quadratic forms on random, UUᵀ-block and mixing tangent directions.

Every evaluation of C is counted; compare evaluations, not outer steps.  F is zero exactly
where the certificate is (for cosine similarity C(cW) = C(W)/c fixes the scale at c² = λ/ρ).

Usage::

    python benchmarks/probe_newton_krylov.py                          # float32, h 1e-3
    python benchmarks/probe_newton_krylov.py --dtype float64 --h 1e-6
    python benchmarks/probe_newton_krylov.py --precondition analytic
    python benchmarks/probe_newton_krylov.py --anderson-iters 0 --precondition kfac --inner 200 --inner-tol 1e-6
    python benchmarks/probe_newton_krylov.py --anderson-iters 0 --diagnose --krylov 40
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


def extend(Q, H, k, w):
    """Arnoldi step k: orthogonalise w against the basis Q (modified Gram–Schmidt), append it, fill column k of H."""
    for j in range(k + 1):
        H[j, k] = float((Q[j] * w).sum())
        w = w - H[j, k] * Q[j]
    H[k + 1, k] = float(torch.linalg.norm(w))
    Q.append(w / H[k + 1, k])


def gmres(op, b, k_max, tol, precondition=None):
    """Flexible GMRES (right preconditioning by any callable) from x = 0; (x, relative residual, products)."""
    nb = float(torch.linalg.norm(b))
    Q, Z, H = [b / nb], [], np.zeros((k_max + 1, k_max))
    for k in range(k_max):
        Z.append(Q[k] if precondition is None else precondition(Q[k]))
        extend(Q, H, k, op(Z[k]))
        e1 = np.zeros(k + 2)
        e1[0] = nb
        y = np.linalg.lstsq(H[:k + 2, :k + 1], e1, rcond=None)[0]
        rel = float(np.linalg.norm(H[:k + 2, :k + 1] @ y - e1)) / nb
        if rel < tol:
            break
    return sum(float(y[j]) * Z[j] for j in range(len(y))), rel, k + 1


def ritz_values(op, b, k):
    """Eigenvalues of the k × k Arnoldi matrix of ``op`` from ``b``, by increasing modulus."""
    Q, H = [b / torch.linalg.norm(b)], np.zeros((k + 1, k))
    for j in range(k):
        extend(Q, H, j, op(Q[j]))
    ev = np.linalg.eigvals(H[:k, :k])
    return ev[np.argsort(np.abs(ev))]


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
    ap.add_argument("--precondition", choices=["none", "analytic", "kfac"], default="none")
    ap.add_argument("--inner", type=int, default=40)
    ap.add_argument("--inner-tol", type=float, default=1e-4)
    ap.add_argument("--diagnose", action="store_true")
    ap.add_argument("--check-cf", action="store_true")
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

    tau = float(warm.temperature)
    phx = warm.map_x_.transform(X, dtype=torch.float64)
    phy = warm.map_y_.transform(Y, dtype=torch.float64)
    batch_rows = np.random.default_rng(1).permutation(len(X))

    def kfac(W):
        """((A_x, B_x), (A_y, B_y)): second moments of the cosine-scaled feature rows and
        the mean softmax covariances (rows' P for y, columns' P̄ for x), over seeded batches of 1,024."""
        U, s, V = truncate(W, r)
        F1, F2 = torch.sqrt(s)[:, None] * U.T, torch.sqrt(s)[:, None] * V.T
        Ax, Ay = torch.zeros((phx.shape[1],) * 2, dtype=torch.float64), torch.zeros((phy.shape[1],) * 2, dtype=torch.float64)
        Bx, By = torch.zeros_like(Ax), torch.zeros_like(Ay)
        for i0 in range(0, len(X), 1024):
            idx = torch.as_tensor(batch_rows[i0:i0 + 1024])
            zx, zy = phx[idx] @ F1.T, phy[idx] @ F2.T
            nx, ny = 1 / zx.norm(dim=1, keepdim=True), 1 / zy.norm(dim=1, keepdim=True)
            fx, fy, zx, zy = phx[idx] * nx, phy[idx] * ny, zx * nx, zy * ny
            t = zx @ zy.T / tau
            P, Pc = torch.softmax(t, 1), torch.softmax(t, 0)
            Ax += fx.T @ fx
            Ay += fy.T @ fy
            mu_y, mu_x = P @ fy, Pc.T @ fx
            By += (fy * P.sum(0)[:, None]).T @ fy - mu_y.T @ mu_y
            Bx += (fx * Pc.sum(1)[:, None]).T @ fx - mu_x.T @ mu_x
        n = len(X)
        return (Ax / n, Bx / n), (Ay / n, By / n)

    def operators(W, U, V, F, C):
        """At the point W (U, V, F, C its evaluation): the Jacobian J (one evaluation of C
        per product), its analytic part A (C held fixed; by finite differences, and in
        closed form) and the Kronecker model K of its data term."""
        h = args.h * float(torch.linalg.norm(W))

        def J(xi):
            Up, sp, Vp = truncate(W + h * xi, r)
            return tangent(U, V, (evaluate((Up * sp) @ Vp.T)[3] - F) / h)

        def A(xi):  # no pass over the rows
            Up, sp, Vp = truncate(W + h * xi, r)
            return tangent(U, V, (tangent(Up, Vp, C) - rho * (Up * sp) @ Vp.T - F) / h)

        Wp = torch.linalg.pinv(W, rtol=1e-10)  # W⁺ of the rank-r point
        PU, PV = U @ U.T, V @ V.T
        IU, IV = torch.eye(PU.shape[0], dtype=W.dtype) - PU, torch.eye(PV.shape[0], dtype=W.dtype) - PV

        def A_closed(xi):
            """A in closed form: D(UUᵀ)[ξ] = (I − UUᵀ)ξW⁺ + ((I − UUᵀ)ξW⁺)ᵀ, likewise for VVᵀ."""
            dU = IU @ xi @ Wp
            dU = dU + dU.T
            dV = IV @ xi.T @ Wp.T
            dV = dV + dV.T
            return tangent(U, V, dU @ C + C @ dV - dU @ C @ PV - PU @ C @ dV) - rho * xi

        Kx, Ky = kfac(W) if args.diagnose or args.precondition == "kfac" else (None, None)

        def K(xi):
            return tangent(U, V, -(Kx[0] @ xi @ Ky[1] + Kx[1] @ xi @ Ky[0]) / (2 * tau))

        return J, A, A_closed, K

    W, U, V, F, C, cert = evaluate(torch.as_tensor(warm.W_, dtype=torch.float64))
    print(f"newton from Anderson iterate {args.warm_iters}: certificate {cert:.2e}", flush=True)
    t0 = time.perf_counter()
    if args.diagnose:
        J, A, _, K = operators(W, U, V, F, C)
        for name, op in (("J", J), ("A+K", lambda x: A(x) + K(x)), ("A", A)):
            ev = ritz_values(op, -F, args.krylov)
            print(name, "Ritz values by |.|:", " ".join(f"{z.real:+.3f}{z.imag:+.3f}j" for z in ev[:12]), "...",
                  " ".join(f"{z.real:+.3f}{z.imag:+.3f}j" for z in ev[-4:]), flush=True)
        g = torch.Generator().manual_seed(0)
        Uo = torch.linalg.svd(W)[0][:, r:]
        kinds = {"random": lambda: tangent(U, V, torch.randn(W.shape, generator=g, dtype=torch.float64)),
                 "UU^T-part": lambda: U @ torch.randn((r, r), generator=g, dtype=torch.float64) @ V.T,
                 "mixing": lambda: Uo @ torch.randn((Uo.shape[1], r), generator=g, dtype=torch.float64) @ V.T}
        for name, make in kinds.items():
            for _ in range(3):
                xi = make()
                xi = xi / xi.norm()
                jx, ax, kx = J(xi), A(xi), K(xi)
                print(f"{name}: <xi,J xi> {float((xi * jx).sum()):+.3e} |J xi| {float(jx.norm()):.3e}  "
                      f"analytic {float((xi * ax).sum()):+.3e}  kfac {float((xi * kx).sum()):+.3e}  "
                      f"|J - A - K| {float((jx - ax - kx).norm()):.3e}", flush=True)
        return
    for outer in range(args.outer):
        jacobian, A, A_closed, K = operators(W, U, V, F, C)
        if args.check_cf:
            xi = tangent(U, V, torch.randn(W.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
            print("closed-form vs FD analytic:", float((A_closed(xi) - A(xi)).norm() / A(xi).norm()), flush=True)
        model = {"analytic": A, "kfac": lambda xi: A_closed(xi) + K(xi)}.get(args.precondition)
        inverse = None if model is None else (lambda v: gmres(model, v, args.inner, args.inner_tol)[0])
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
