"""Randomized SVD (Halko, Martinsson & Tropp 2011) against numpy's LAPACK SVD."""

import numpy as np
import pytest
import torch

import unicon_dist as ud

from _refs import svd_truncate

# Stated tolerances on the slow-decay matrix (300 × 200, σ_i = i^(−1/2)), rank r = 10,
# oversampling p = 10, q = 3 subspace iterations.  Over 30 seeds the worst values seen
# were 7.0e-3, 5.4e-3, 4.1e-4 and 1.7e-3 respectively.
SV_RTOL = 1e-2  # max_i |s_i − σ_i| / σ_i over the top r
SIN_THETA_TOP3 = 2e-2  # ‖sin Θ(U_3, U_3*)‖₂ (σ_1..σ_4 are well separated, unlike σ_10, σ_11)
FRO_EXCESS = 1e-3  # ‖A − U S Vh‖_F / ‖A − A_r‖_F − 1
SPEC_EXCESS = 5e-3  # ‖A − U S Vh‖₂ / σ_{r+1} − 1


def _orth(rng, m, k):
    Q, R = np.linalg.qr(rng.standard_normal((m, k)))
    return Q * np.sign(np.diag(R))


def matrix_with_spectrum(sigma, m, n, seed):
    rng = np.random.default_rng(seed)
    k = len(sigma)
    return (_orth(rng, m, k) * sigma) @ _orth(rng, n, k).T


def slow_decay(seed):
    sigma = np.arange(1, 201) ** -0.5
    return matrix_with_spectrum(sigma, 300, 200, seed)


def _np(*ts):
    return tuple(t.numpy() for t in ts)


def _sign_fix(U, Vt):
    """Independent sign rule: the largest-magnitude entry of each column of U is positive."""
    s = np.sign(U[np.abs(U).argmax(axis=0), np.arange(U.shape[1])])
    return U * s, Vt * s[:, None]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slow_decay_accuracy(seed):
    A = slow_decay(seed)
    r = 10
    U, s, Vh = _np(*ud.randomized_svd(torch.as_tensor(A), r, oversampling=10, n_power_iter=3, seed=seed))
    assert U.shape == (300, r) and s.shape == (r,) and Vh.shape == (r, 200)
    Ue, se, Vte = np.linalg.svd(A, full_matrices=False)
    assert np.all(np.diff(s) <= 0) and np.all(s > 0)
    assert np.max(np.abs(s - se[:r]) / se[:r]) < SV_RTOL
    # orthonormal factors
    np.testing.assert_allclose(U.T @ U, np.eye(r), atol=1e-12)
    np.testing.assert_allclose(Vh @ Vh.T, np.eye(r), atol=1e-12)
    # top-3 subspace
    sin = np.linalg.norm(U[:, :3] - Ue[:, :3] @ (Ue[:, :3].T @ U[:, :3]), 2)
    assert sin < SIN_THETA_TOP3
    # near-optimal approximation error (Eckart–Young: ‖A − A_r‖_F, ‖A − A_r‖₂ = σ_{r+1})
    R = A - (U * s) @ Vh
    opt = np.linalg.norm(A - svd_truncate(A, r))
    assert np.linalg.norm(R) / opt - 1 < FRO_EXCESS
    assert np.linalg.norm(R, 2) / se[r] - 1 < SPEC_EXCESS


def test_more_power_iterations_are_more_accurate():
    A = slow_decay(3)
    r = 10
    se = np.linalg.svd(A, compute_uv=False)
    opt = np.linalg.norm(A - svd_truncate(A, r))
    sv_err, fro_err = [], []
    for q in (0, 1, 2, 3, 5):
        U, s, Vh = _np(*ud.randomized_svd(A, r, oversampling=10, n_power_iter=q, seed=0))
        sv_err.append(np.max(np.abs(s - se[:r]) / se[:r]))
        fro_err.append(np.linalg.norm(A - (U * s) @ Vh) / opt - 1)
    assert np.all(np.diff(sv_err) < 0), sv_err
    assert np.all(np.diff(fro_err) < 0), fro_err
    assert sv_err[0] > 0.1 and sv_err[-1] < 1e-3  # q = 0 really is poor here, q = 5 good
    # more oversampling helps too
    U, s, Vh = _np(*ud.randomized_svd(A, r, oversampling=40, n_power_iter=0, seed=0))
    assert np.linalg.norm(A - (U * s) @ Vh) / opt - 1 < fro_err[0]


@pytest.mark.parametrize("q", [0, 2])
def test_fast_decay_is_exact(q):
    sigma = 0.5 ** np.arange(40)  # σ_{k+1}/σ_r ≤ 2^−10 with k = r + p
    A = matrix_with_spectrum(sigma, 120, 70, 5)
    r = 6
    U, s, Vh = _np(*ud.randomized_svd(torch.as_tensor(A), r, oversampling=10, n_power_iter=q, seed=1))
    Ue, se, Vte = np.linalg.svd(A, full_matrices=False)
    Ue, Vte = _sign_fix(Ue[:, :r], Vte[:r])
    tol = 1e-10 if q else 1e-5  # q = 0: no power iteration, observed 1.7e-7
    np.testing.assert_allclose(s, se[:r], rtol=tol)
    if q:
        np.testing.assert_allclose(U, Ue, atol=1e-10)
        np.testing.assert_allclose(Vh, Vte, atol=1e-10)


def test_exactly_low_rank_numpy_input():
    A = matrix_with_spectrum(np.array([5.0, 3.0, 2.0, 1.0, 0.5]), 40, 30, 6)
    U, s, Vh = _np(*ud.randomized_svd(A, 5, oversampling=3, n_power_iter=0, seed=2))  # ndarray input
    Ue, se, Vte = np.linalg.svd(A, full_matrices=False)
    Ue, Vte = _sign_fix(Ue[:, :5], Vte[:5])
    np.testing.assert_allclose(s, se[:5], rtol=1e-12)
    np.testing.assert_allclose(U, Ue, atol=1e-12)
    np.testing.assert_allclose(Vh, Vte, atol=1e-12)
    np.testing.assert_allclose((U * s) @ Vh, A, atol=1e-12 * np.abs(A).max())


def test_deterministic_and_sign_convention():
    A = slow_decay(4)
    a = ud.randomized_svd(A, 8, seed=11)
    b = ud.randomized_svd(torch.as_tensor(A), 8, seed=11)
    for x, y in zip(a, b):
        assert x.dtype == torch.float64
        assert torch.equal(x, y)
    c = ud.randomized_svd(A, 8, seed=12)
    assert not torch.equal(a[0], c[0])  # another seed, another sketch (slow decay: visibly different)
    U, s, Vh = _np(*a)
    top = U[np.abs(U).argmax(axis=0), np.arange(U.shape[1])]
    assert np.all(top > 0)
    # A Vᵀ = U S holds with these signs (Vh carries the same flips as U)
    np.testing.assert_allclose(U.T @ A @ Vh.T, np.diag(s), atol=1e-12)


def test_sign_convention_with_negated_matrix():
    A = matrix_with_spectrum(np.array([4.0, 2.0, 1.0]), 20, 10, 7)
    U1, s1, V1 = _np(*ud.randomized_svd(A, 3, seed=0))
    U2, s2, V2 = _np(*ud.randomized_svd(-A, 3, seed=0))
    np.testing.assert_allclose(s1, s2, rtol=1e-12)
    np.testing.assert_allclose(U1, U2, atol=1e-12)  # U fixed by the sign rule, Vh flips
    np.testing.assert_allclose(V1, -V2, atol=1e-12)


@pytest.mark.parametrize("rank", [0, 31, 41])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        ud.randomized_svd(np.ones((40, 30)), rank)


def test_bad_oversampling_and_power_iter():
    with pytest.raises(ValueError):
        ud.randomized_svd(np.eye(5), 2, oversampling=-1)
    with pytest.raises(ValueError):
        ud.randomized_svd(np.eye(5), 2, n_power_iter=-1)


def test_sketch_capped_at_min_dimension():
    # r + p > min(m, n): the sketch is the whole range, so the result is the exact SVD
    A = np.random.default_rng(8).standard_normal((25, 12))
    U, s, Vh = _np(*ud.randomized_svd(A, 12, oversampling=10, n_power_iter=0))
    np.testing.assert_allclose(s, np.linalg.svd(A, compute_uv=False), rtol=1e-12)
    np.testing.assert_allclose((U * s) @ Vh, A, atol=1e-12)


# ---------------------------------------------------------------- matrix-free
def _operator(n=70, m_x=14, m_y=11, r=4, seed=0):
    rng = np.random.default_rng(seed)
    phi_x = rng.standard_normal((n, m_x))
    phi_y = phi_x[:, :m_y] + 0.5 * rng.standard_normal((n, m_y))
    z_x = rng.standard_normal((n, r))
    z_y = z_x + 0.5 * rng.standard_normal((n, r))
    z_x /= np.linalg.norm(z_x, axis=1, keepdims=True)
    z_y /= np.linalg.norm(z_y, axis=1, keepdims=True)
    return ud.CrossProductOperator(phi_x, phi_y, z_x, z_y, temperature=0.5, block_rows=16, block_cols=16)


def test_operator_products_match_materialized():
    op = _operator()
    C = op.materialize().numpy()
    assert op.shape == C.shape == (14, 11)
    rng = np.random.default_rng(1)
    Om = rng.standard_normal((11, 3))
    Om2 = rng.standard_normal((14, 3))
    np.testing.assert_allclose(op.matmul(torch.as_tensor(Om)).numpy(), C @ Om, atol=1e-12 * np.abs(C).max())
    np.testing.assert_allclose(op.rmatmul(torch.as_tensor(Om2)).numpy(), C.T @ Om2, atol=1e-12 * np.abs(C).max())


@pytest.mark.parametrize("rank, p, q", [(3, 2, 2), (4, 10, 1)])
def test_matrix_free_equals_explicit(rank, p, q):
    op = _operator()
    C = op.materialize()
    a = ud.randomized_svd(op, rank, oversampling=p, n_power_iter=q, seed=5)
    b = ud.randomized_svd(C, rank, oversampling=p, n_power_iter=q, seed=5)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=0, atol=1e-10 * max(1.0, float(y.abs().max())))


def test_closed_form_step_operator_with_ridge():
    op = _operator(seed=2)
    C = op.materialize()
    r, ridge = 3, 0.1
    kw = dict(svd="randomized", factorization="sqrt", ridge=ridge, oversampling=4, n_power_iter=2, seed=9)
    F1o, F2o = ud.closed_form_step(op, r, **kw)
    F1c, F2c = ud.closed_form_step(C, r, **kw)
    assert F1o.shape == (r, 14) and F2o.shape == (r, 11)
    scale = float(F1c.abs().max())
    np.testing.assert_allclose(F1o.numpy(), F1c.numpy(), rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(F2o.numpy(), F2c.numpy(), rtol=0, atol=1e-10 * scale)
    # the sketch spans all 11 columns (k = min(r + p, m) with p large): both equal the exact
    # rank-r truncation of C + ridge·I_{14×11}, computed here with numpy
    full = dict(kw, oversampling=20)
    F1, F2 = ud.closed_form_step(op, r, **full)
    Cn = C.numpy() + ridge * np.eye(14, 11)
    np.testing.assert_allclose((F1.T @ F2).numpy(), svd_truncate(Cn, r), rtol=0,
                               atol=1e-10 * np.abs(Cn).max())
    # and the ridge matters (the check is not vacuous)
    assert np.abs(svd_truncate(Cn, r) - svd_truncate(C.numpy(), r)).max() > 1e-3


def test_closed_form_step_operator_needs_randomized():
    op = _operator()
    with pytest.raises(ValueError, match="randomized"):
        ud.closed_form_step(op, 2, svd="exact")
    with pytest.raises(ValueError, match="rank"):
        ud.closed_form_step(op, 12, svd="randomized")
