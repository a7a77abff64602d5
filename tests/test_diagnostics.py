"""Numerical diagnostics of a solve (issue 8), on constructed cases with known answers."""

import json
import warnings

import numpy as np
import pytest
import torch

import unicon_dist as ud
from unicon_dist.math.closed_form import closed_form_step, fixed_point_residual, spectral_gap
from unicon_dist.solver.diagnostics import flatten_diagnostics, format_diagnostics
from unicon_dist.math.kernels import get_kernel
from unicon_dist.math.nystrom import NystroemMap, spectrum_summary
from test_model import _two_cycle_data

from _budgets import panel_budget
from unicon_dist.math.linalg import randomized_svd
from unicon_dist.solver.passes import statistics_summary

from _refs import tangent_projection


def _with_singular_values(s, m, n, seed=0):
    """An m x n matrix with the given singular values (and random singular vectors)."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((m, len(s))))[0]
    V = np.linalg.qr(rng.standard_normal((n, len(s))))[0]
    return (U * np.asarray(s)) @ V.T


def _pair_data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 12))
    Y = X @ rng.normal(size=(12, 9)) + 0.5 * rng.normal(size=(n, 9))
    return X, Y


# --------------------------------------------------------------- Nyström spectrum
def test_spectrum_summary_of_a_kll_with_known_condition_and_rank():
    # linear kernel: K_LL = L Lᵀ has eigenvalues sv², here 1 ... 1e-5 (condition 1e5)
    eig = np.array([1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5])
    L = _with_singular_values(np.sqrt(eig), 6, 6, seed=1)
    fmap = NystroemMap.from_landmarks(get_kernel("linear"), L, eig_floor=1e-10)
    spec = fmap.spectrum
    assert spec["n_landmarks"] == 6 and spec["effective_rank"] == 6 and spec["n_floored"] == 0
    assert spec["condition_number"] == pytest.approx(1e5, rel=1e-6)
    assert spec["largest"] == pytest.approx(1.0, rel=1e-9) and spec["smallest"] == pytest.approx(1e-5, rel=1e-6)
    # a floor between 1e-4 and 1e-3 keeps four eigenvalues
    with pytest.warns(RuntimeWarning, match="effective rank 4 of 6"):
        floored = NystroemMap.from_landmarks(get_kernel("linear"), L, eig_floor=3e-4).spectrum
    assert floored["effective_rank"] == 4 and floored["n_floored"] == 2
    assert floored["condition_kept"] == pytest.approx(1e3, rel=1e-6)
    assert floored["condition_number"] == pytest.approx(1e5, rel=1e-6)


def test_spectrum_of_duplicated_landmarks_is_singular():
    rng = np.random.default_rng(0)
    L = rng.normal(size=(5, 8))
    L = np.vstack([L, L[:2]])  # two duplicated landmarks: K_LL has rank 5 of 7
    with pytest.warns(RuntimeWarning, match="effective rank 5 of 7"):
        fmap = NystroemMap.from_landmarks(get_kernel("rbf", bandwidth=3.0), L)
    spec = fmap.spectrum
    assert spec["effective_rank"] == 5 and spec["n_floored"] == 2
    assert spec["condition_number"] > 1e12  # λ_min is round-off (or ≤ 0: inf)
    # the summary of a given spectrum, independently
    s = spectrum_summary(torch.tensor([4.0, 2.0, 0.0, -1e-17]), 1e-10)
    assert s["condition_number"] == float("inf") and s["effective_rank"] == 2 and s["n_floored"] == 2


# ----------------------------------------------------------- spectral gap, SVD
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_spectral_gap_of_a_c_with_a_known_gap(svd):
    s = np.array([10.0, 8.0, 5.0, 2.0, 1.0, 0.5, 0.25, 0.1])
    C = _with_singular_values(s, 30, 20, seed=2)
    *_, info = closed_form_step(C, 3, svd=svd, oversampling=5, return_info=True)
    assert info["spectral_gap"] == pytest.approx(5.0 / 2.0, rel=1e-8)
    assert spectral_gap(s, 3) == 2.5 and spectral_gap(s, 8) is None
    assert spectral_gap([3.0, 0.0], 1) == float("inf")
    if svd == "exact":
        assert info["residual"] is None
    else:  # k = 8 >= the rank of C: the sketch holds all of it
        assert info["residual"] < 1e-10


def test_randomized_residual_estimates_the_range_error():
    s = np.concatenate([np.linspace(10, 5, 6), np.full(40, 0.3)])  # a flat tail beyond rank 6
    A = _with_singular_values(s, 80, 60, seed=3)
    _, _, _, info = randomized_svd(A, 4, oversampling=2, n_power_iter=1, seed=0, return_info=True, n_test=20)
    Q = np.linalg.qr(info["U_k"].numpy())[0]
    resid = A - Q @ (Q.T @ A)
    true_fro = np.linalg.norm(resid) / np.linalg.norm(A)
    assert 0.5 * true_fro < info["residual"] < 2.0 * true_fro
    # the a-posteriori bound holds (probability 1 - 1e-20)
    assert info["residual_bound"] >= np.linalg.norm(resid, 2)
    # the extra test vectors do not change the result.  Not bitwise: the sketch's GEMM has
    # 20 more columns, and BLAS may block (and so round) it differently on another CPU.
    # float64 with well-separated singular values (gaps >= 1 against sigma_1 = 10):
    # the values agree to a few ulps times the condition of the range finder.
    plain = randomized_svd(A, 4, oversampling=2, n_power_iter=1, seed=0)
    torch.testing.assert_close(plain[1], info["s_k"][:4], rtol=1e-12, atol=0)


# ----------------------------------------------------------- fixed-point residual
def test_fixed_point_residual_is_zero_at_a_fixed_point_and_matches_the_tangent_projection():
    C = torch.as_tensor(_with_singular_values([5.0, 3.0, 2.0, 1.0, 0.5], 9, 7, seed=4))
    rho = 2.0
    F1, F2 = closed_form_step(C, 2, rho=rho, factorization="sqrt")
    assert fixed_point_residual(C, F1, F2, rho, "sqrt") < 1e-12
    G1, G2 = closed_form_step(C, 2, factorization="orthonormal")
    assert fixed_point_residual(C, G1, G2, rho, "orthonormal") < 1e-12
    # off the fixed point: the definition, against the dense tangent projection of _refs
    rng = np.random.default_rng(5)
    H1, H2 = torch.as_tensor(rng.normal(size=(2, 9))), torch.as_tensor(rng.normal(size=(2, 7)))
    W = (H1.T @ H2).numpy()
    Z = rho * W - C.numpy()
    expected = np.linalg.norm(tangent_projection(Z, W, 2)) / np.linalg.norm(tangent_projection(C.numpy(), W, 2))
    assert fixed_point_residual(C, H1, H2, rho, "sqrt") == pytest.approx(expected, rel=1e-10)
    assert fixed_point_residual(C, H1, H2, rho, "orthonormal") > 0.1


def test_a_converged_fit_has_a_vanishing_residual_in_its_history():
    # the contraction of test_model's fixed-point tests: dot similarity, ρ large against 1/τ
    X, Y = _pair_data(150)
    X, Y = 0.5 * X[:, :6] / X.std(), 0.5 * Y[:, :5] / Y.std()
    model = ud.UniCon(rank=2, similarity="dot", rho=20.0, temperature=1.0, center=False, whiten=None, tol=1e-10,
                      loss_tol=0, max_iter=200, dtype="float64").fit(X, Y)
    assert model.converged_
    res = [h["residual"] for h in model.history_]
    assert res == [h["input_residual"] for h in model.history_]  # the certificate of each iterate
    assert res[-1] <= 1e-10 < 1e-6 < res[0]
    # the proximal step factors M = ηC + (1 − η)ρW; at the fixed point ρW = [C]_r, so M keeps
    # C's top r singular values and scales the rest by η: its gap is σ_r / (η σ_{r+1})
    last = model.history_[-1]
    s = torch.linalg.svdvals(torch.as_tensor(model.C_))
    assert last["spectral_gap_of"] == "damped target"
    assert last["spectral_gap"] == pytest.approx(float(s[1] / (model.damping * s[2])), rel=1e-6)


# ----------------------------------------------------------- log-sum-exp statistics
def test_lse_range_equals_the_dense_log_sum_exp_over_negatives():
    rng = np.random.default_rng(6)
    n, tau = 40, 0.2
    zx = torch.as_tensor(rng.normal(size=(n, 3)))
    zy = torch.as_tensor(rng.normal(size=(n, 3)))
    phi = torch.as_tensor(rng.normal(size=(n, 4)))
    op = ud.CrossProductOperator(phi, phi, zx, zy, temperature=tau, dtype=torch.float64)
    t = (zx @ zy.T / tau).numpy()
    np.fill_diagonal(t, -np.inf)
    rows = np.log(np.exp(t).sum(1))
    cols = np.log(np.exp(t).sum(0))
    lo, hi = min(rows.min(), cols.min()), max(rows.max(), cols.max())
    assert op.statistics["lse_min"] == pytest.approx(lo, rel=1e-10)
    assert op.statistics["lse_max"] == pytest.approx(hi, rel=1e-10)
    # small τ with unnormalised embeddings: the statistics go to log space (and say so)
    cold = ud.CrossProductOperator(phi, phi, 30 * zx, zy, temperature=0.01, negatives=10)
    assert cold.statistics["log_space_batches"] == cold.statistics["batches"] == 4
    assert statistics_summary([]) == {"lse_min": None, "lse_max": None, "log_space_batches": 0, "batches": 0}


# ----------------------------------------------------------- the model's record
def test_fit_records_diagnostics_in_history_model_file_and_job_log(tmp_path):
    X, Y = _pair_data()
    model = ud.UniCon(rank=3, kernel="rbf", n_landmarks=40, max_iter=4).fit(X, Y)
    h = model.history_[-1]
    for key in ("spectral_gap", "spectral_gap_of", "svd_residual", "input_residual", "lse_min", "lse_max",
                "log_space_batches"):
        assert key in h
    d = model.diagnostics_
    assert d["nystrom"]["x"]["n_landmarks"] == 40 and d["nystrom"]["x"]["effective_rank"] == 40
    assert d["whitening"]["y"]["condition_regularised"] > 1
    assert d["lse_range"][0] <= h["lse_min"] <= h["lse_max"] <= d["lse_range"][1]
    assert d["last_step"]["spectral_gap"] == h["spectral_gap"]
    json.dumps(d)  # JSON-able
    model.save(tmp_path / "m.npz")
    assert ud.UniCon.load(tmp_path / "m.npz").diagnostics_ == json.loads(json.dumps(d))
    flat = flatten_diagnostics(d)
    assert flat["diagnostics.nystrom.x.condition_number"] == d["nystrom"]["x"]["condition_number"]
    text = "\n".join(format_diagnostics(d))
    assert "Nystrom X: K_LL condition" in text and "spectral gap" in text


def test_safeguards_are_listed_and_warned_by_name():
    X, Y = _pair_data()
    Xd = np.vstack([X[:30], X[:10]])  # landmarks = all rows: 10 duplicates
    Yd = np.vstack([Y[:30], Y[:10]])
    with pytest.warns(RuntimeWarning) as caught:
        model = ud.UniCon(rank=2, kernel="rbf", n_landmarks=40, similarity="dot", temperature=0.01, max_iter=2,
                          loss_tol=0).fit(Xd, Yd)
    names = {s["name"] for s in model.diagnostics_["safeguards"]}
    assert {"nystrom eigenvalue floor", "log-space statistics", "lowest residual iterate kept"} <= names
    messages = " ".join(str(w.message) for w in caught)
    assert "effective rank 30 of 40" in messages and "safeguard 'log-space statistics'" in messages
    floor = next(s for s in model.diagnostics_["safeguards"] if s["name"] == "nystrom eigenvalue floor")
    assert "10 of 40 eigenvalues" in floor["detail"]
    # a clean fit fires none
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = ud.UniCon(rank=6, temperature=0.5).fit(*_two_cycle_data())
    assert clean.diagnostics_["safeguards"] == [] and clean.stop_reason_ == "converged"


# ----------------------------------------------------------- the float64 verifier
def test_tiles_sum_to_the_materialized_c():
    rng = np.random.default_rng(7)
    n = 90
    phi_x, phi_y = rng.normal(size=(n, 5)), rng.normal(size=(n, 4))
    zx, zy = rng.normal(size=(n, 3)), rng.normal(size=(n, 3))
    zx /= np.linalg.norm(zx, axis=1, keepdims=True)
    zy /= np.linalg.norm(zy, axis=1, keepdims=True)
    for kw in ({}, {"negatives": 40}, {"groups": np.arange(n) // 3}, {"loss": "sigmoid"}):
        op = ud.CrossProductOperator(phi_x, phi_y, zx, zy, temperature=0.2, block_rows=16, block_cols=32,
                                     panel_rows=50, dtype=torch.float64, **kw)
        keys = op.tile_keys()
        assert len(keys) > 4
        total = sum(op.tile_product(k) for k in keys)
        torch.testing.assert_close(total, op.materialize(), rtol=1e-12, atol=1e-14)


def _verified(monkeypatch=None, **options):
    X, Y = _pair_data(200)
    return ud.UniCon(rank=3, negatives=50, max_iter=3, **options).fit(X, Y)


def test_verifier_reports_float32_round_off_and_nothing_for_float64():
    v32 = _verified(verify="full").diagnostics_["verify"]
    assert v32["mode"] == "full" and v32["tiles"] == v32["tiles_total"] == 4
    assert 1e-9 < v32["c_rel_error"] < 1e-5 and v32["sv_rel_error"] < 1e-5 and v32["loss_rel_error"] < 1e-6
    v64 = _verified(verify="full", dtype="float64").diagnostics_["verify"]
    assert v64["c_rel_error"] < 1e-13 and v64["dtype"] == "float64"
    sample = _verified(verify=2).diagnostics_["verify"]
    assert sample["mode"] == "sample" and sample["tiles"] == 2
    assert _verified(verify=2).diagnostics_["verify"]["worst_tile"] == sample["worst_tile"]  # seeded
    with pytest.raises(ValueError, match="verify must be"):
        ud.UniCon(verify=0).fit(*_pair_data(20))


def test_verifier_catches_an_injected_error_in_one_tile(monkeypatch):
    from unicon_dist.solver.operator import CrossProductOperator

    clean = _verified(verify="full").diagnostics_["verify"]
    original = CrossProductOperator._tile_exp
    bad = {"batch": 2}

    def corrupted(self, b, P, Q, i0, i1, j0, j1):
        g = original(self, b, P, Q, i0, i1, j0, j1)
        if self.dtype == torch.float32 and b.key == bad["batch"] and i0 == 0 and j0 == 0:
            g = g.clone()
            g[3, 7] += 0.5  # one wrong entry of S in one tile of the working precision
        return g

    monkeypatch.setattr(CrossProductOperator, "_tile_exp", corrupted)
    v = _verified(verify="full").diagnostics_["verify"]
    assert v["c_rel_error"] > 1e3 * clean["c_rel_error"]
    assert v["worst_tile"]["batch"] == bad["batch"] and v["worst_tile"]["positions"][0] == 0
    assert v["tile_max_rel_error"] > 1e-3
    # a sample that includes every tile finds it too; the log names the rows
    v_all = _verified(verify=4).diagnostics_["verify"]
    assert v_all["worst_tile"] == v["worst_tile"]
    assert "batch 2" in "\n".join(format_diagnostics({"verify": v}))


def test_verifier_on_a_store_fit_matches_the_in_memory_one(tmp_path):
    X, Y = _pair_data(200)
    store = ud.PairStore.create(tmp_path / "s.zarr", X.shape[1], Y.shape[1])
    store.append(X, Y)
    mem = ud.UniCon(rank=3, negatives=50, max_iter=3, verify="full").fit(X.astype(np.float32), Y.astype(np.float32))
    disk = ud.UniCon(rank=3, negatives=50, max_iter=3, verify="full",
                     memory_budget=panel_budget(store, rows=60, rank=3, negatives=50, verify="full")).fit(store)
    a, b = mem.diagnostics_["verify"], disk.diagnostics_["verify"]
    assert b["tiles_total"] >= a["tiles_total"]
    assert b["c_rel_error"] == pytest.approx(a["c_rel_error"], rel=0.5)
