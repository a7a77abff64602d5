"""closed_form_step: W* = [C + ridge·I]_r / ρ and its factorisations (DESIGN §2)."""

import numpy as np
import pytest
import torch

import unicon_dist as ud

from _refs import svd_truncate


def _C(m_x, m_y, seed=0):
    # well separated singular values so U_r, V_r are unique up to sign
    rng = np.random.default_rng(seed)
    Q1, _ = np.linalg.qr(rng.standard_normal((m_x, m_x)))
    Q2, _ = np.linalg.qr(rng.standard_normal((m_y, m_y)))
    k = min(m_x, m_y)
    sv = np.linspace(3.0, 0.2, k) * (1 + 0.05 * rng.random(k))
    D = np.zeros((m_x, m_y))
    D[np.arange(k), np.arange(k)] = np.sort(sv)[::-1]
    return Q1 @ D @ Q2.T


SHAPES = [(12, 10), (10, 12), (8, 8)]


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("rho", [1.0, 2.5])
@pytest.mark.parametrize("rank", [1, 3, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_sqrt_factorization_is_truncated_svd_over_rho(shape, rank, rho, kind):
    C = _C(*shape, seed=rank)
    Cin = torch.from_numpy(C) if kind == "torch" else C
    F1, F2 = ud.closed_form_step(Cin, rank, rho=rho, factorization="sqrt")
    if kind == "torch":
        assert isinstance(F1, torch.Tensor) and isinstance(F2, torch.Tensor)
        assert F1.dtype == torch.float64 and F2.dtype == torch.float64
        F1, F2 = F1.numpy(), F2.numpy()
    else:
        assert isinstance(F1, np.ndarray) and F1.dtype == np.float64
    assert F1.shape == (rank, shape[0]) and F2.shape == (rank, shape[1])
    W_ref = svd_truncate(C, rank) / rho
    np.testing.assert_allclose(F1.T @ F2, W_ref, rtol=0, atol=1e-12 * np.abs(W_ref).max())
    # balanced factors: F1 F1ᵀ = F2 F2ᵀ = Σ_r/ρ
    sv = np.linalg.svd(C, compute_uv=False)[:rank]
    np.testing.assert_allclose(F1 @ F1.T, np.diag(sv / rho), atol=1e-12)
    np.testing.assert_allclose(F2 @ F2.T, np.diag(sv / rho), atol=1e-12)


@pytest.mark.parametrize("rank", [1, 3, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_orthonormal_factorization(shape, rank):
    C = _C(*shape, seed=10 + rank)
    F1, F2 = ud.closed_form_step(C, rank, rho=3.0, factorization="orthonormal")
    assert F1.shape == (rank, shape[0]) and F2.shape == (rank, shape[1])
    np.testing.assert_allclose(F1 @ F1.T, np.eye(rank), atol=1e-12)
    np.testing.assert_allclose(F2 @ F2.T, np.eye(rank), atol=1e-12)
    U, sv, Vt = np.linalg.svd(C)
    # same subspaces as numpy's SVD, with left/right signs paired: F1 C F2ᵀ = Σ_r
    np.testing.assert_allclose(F1.T @ F1, U[:, :rank] @ U[:, :rank].T, atol=1e-12)
    np.testing.assert_allclose(F2.T @ F2, Vt[:rank].T @ Vt[:rank], atol=1e-12)
    np.testing.assert_allclose(F1 @ C @ F2.T, np.diag(sv[:rank]), atol=1e-12)


def test_default_factorization_is_orthonormal():
    C = _C(9, 7, seed=3)
    F1, F2 = ud.closed_form_step(C, 2)
    np.testing.assert_allclose(F1 @ F1.T, np.eye(2), atol=1e-12)
    np.testing.assert_allclose(F2 @ F2.T, np.eye(2), atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ridge", [0.3, 2.0])
def test_ridge_adds_to_leading_diagonal(shape, ridge):
    C = _C(*shape, seed=5)
    rank, rho = 3, 1.7
    I = np.eye(*shape)  # ones on the leading diagonal of the m_x × m_y matrix
    F1, F2 = ud.closed_form_step(C, rank, rho=rho, ridge=ridge, factorization="sqrt")
    W_ref = svd_truncate(C + ridge * I, rank) / rho
    np.testing.assert_allclose(F1.T @ F2, W_ref, rtol=0, atol=1e-12 * np.abs(W_ref).max())
    # and it changes the answer
    assert np.abs(W_ref - svd_truncate(C, rank) / rho).max() > 1e-3
    G1, G2 = ud.closed_form_step(C, rank, rho=rho, ridge=ridge, factorization="orthonormal")
    U, _, Vt = np.linalg.svd(C + ridge * I)
    np.testing.assert_allclose(G1.T @ G1, U[:, :rank] @ U[:, :rank].T, atol=1e-12)
    np.testing.assert_allclose(G2.T @ G2, Vt[:rank].T @ Vt[:rank], atol=1e-12)


def test_input_not_modified():
    C = _C(6, 5, seed=8)
    C0 = C.copy()
    ud.closed_form_step(C, 2, ridge=1.0, factorization="sqrt")
    Ct = torch.from_numpy(C.copy())
    ud.closed_form_step(Ct, 2, ridge=1.0, factorization="sqrt")
    np.testing.assert_array_equal(C, C0)
    np.testing.assert_array_equal(Ct.numpy(), C0)


def _objective(W, C, rho):
    return float(np.sum(W * C) - 0.5 * rho * np.sum(W * W))


def _gradient_ascent(C, rank, rho, steps, seed):
    """Plain gradient ascent on (F1, F2), W = F1ᵀF2, from a small random start."""
    rng = np.random.default_rng(seed)
    m_x, m_y = C.shape
    F1 = 0.1 * rng.standard_normal((rank, m_x))
    F2 = 0.1 * rng.standard_normal((rank, m_y))
    lr = 0.1 / np.linalg.norm(C, 2)
    for _ in range(steps):
        G = C - rho * (F1.T @ F2)  # ∂/∂W of tr(WᵀC) − ρ/2‖W‖²
        g1, g2 = F2 @ G.T, F1 @ G
        F1, F2 = F1 + lr * rho * g1, F2 + lr * rho * g2
    return F1.T @ F2


@pytest.mark.parametrize("rho", [1.0, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_beats_gradient_ascent(seed, rho):
    rng = np.random.default_rng(100 + seed)
    C = rng.standard_normal((12, 10))
    rank = 3
    F1, F2 = ud.closed_form_step(C, rank, rho=rho, factorization="sqrt")
    W_cf = F1.T @ F2
    assert np.linalg.matrix_rank(W_cf, tol=1e-9) == rank
    f_cf = _objective(W_cf, C, rho)
    W_gd = _gradient_ascent(C, rank, rho, steps=4000, seed=seed)
    f_gd = _objective(W_gd, C, rho)
    assert f_cf >= f_gd - 1e-9 * abs(f_cf)
    # the comparison is meaningful: gradient ascent gets (nearly) to the optimum ...
    assert f_gd >= f_cf - 1e-4 * abs(f_cf)
    # ... whose value is Σ_{i≤r} σ_i² / (2ρ)
    sv = np.linalg.svd(C, compute_uv=False)
    assert f_cf == pytest.approx(np.sum(sv[:rank] ** 2) / (2 * rho), rel=1e-12)
