"""UniCon end to end: first step, fixed point, API, persistence (DESIGN §2, §5)."""

import json
import os

import numpy as np
import pytest
import torch

import unicon_dist as ud
from unicon_dist.data.rows import embed

from _options import paper_unicon
from _refs import batches, rel_err, svd_truncate, tangent_projection, uneven_groups


def two_view(n, d_x=8, d_y=6, latent=3, noise=0.3, seed=0, scale=1.0):
    """Toy paired data: both views are noisy linear images of a shared latent code."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, latent))
    A = rng.standard_normal((latent, d_x))
    B = rng.standard_normal((latent, d_y))
    X = Z @ A + noise * rng.standard_normal((n, d_x)) + 0.5  # non-zero mean: centring matters
    Y = Z @ B + noise * rng.standard_normal((n, d_y)) - 0.3
    return scale * X, scale * Y


def _W(model):
    W = np.asarray(model.W_, dtype=np.float64)
    np.testing.assert_allclose(W, np.asarray(model.F1_, dtype=np.float64).T @ np.asarray(model.F2_, dtype=np.float64),
                               rtol=0, atol=1e-12 * max(np.abs(W).max(), 1e-300))
    return W


# --------------------------------------------------------------------------------------
# (a) the s = 0 first step
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank, rho", [(1, 1.0), (3, 2.5)])
def test_first_step_is_centred_cross_covariance_svd(rank, rho):
    n = 200
    X, Y = two_view(n, seed=1)
    model = paper_unicon(rank=rank, loss="clip", nu=1.0, similarity="dot", factorization="sqrt",
                      rho=rho, max_iter=1, dtype="float64")
    assert model.fit(X, Y) is model
    H = np.eye(n) - np.ones((n, n)) / n
    W_ref = svd_truncate(X.T @ H @ Y / n, rank) / rho
    W = _W(model)
    assert W.shape == (8, 6)
    assert model.F1_.shape == (rank, 8) and model.F2_.shape == (rank, 6)
    assert rel_err(W, W_ref) < 1e-10
    # centring matters here (the uncentred cross-moment gives a different answer)
    assert rel_err(svd_truncate(X.T @ Y / n, rank) / rho, W_ref) > 1e-2


@pytest.mark.parametrize("negatives", ["full", 47])
def test_first_step_with_groups_and_batches(negatives):
    """At s = 0 the step is [Φ_Xᵀ S(0) Φ_Y]_r/ρ for any positive structure / batch split."""
    n = 180
    X, Y = two_view(n, seed=2)
    groups = uneven_groups([1, 2, 3, 4] * 18, rng=np.random.default_rng(3), shuffle=True)
    assert len(groups) == n
    rank, rho, seed = 2, 1.5, 7
    model = paper_unicon(rank=rank, similarity="dot", factorization="sqrt", rho=rho, max_iter=1,
                      negatives=negatives, seed=seed, dtype="float64").fit(X, Y, groups=groups)
    if negatives == "full":
        C = X.T @ ud.similarity_weights(np.zeros((n, n)), groups=groups) @ Y
    else:
        C = np.zeros((8, 6))
        for idx in batches(n, negatives, seed):
            S_b = ud.similarity_weights(np.zeros((len(idx), len(idx))), groups=groups[idx]) * (len(idx) / n)
            C += X[idx].T @ S_b @ Y[idx]
    assert rel_err(_W(model), svd_truncate(C, rank) / rho) < 1e-10


# --------------------------------------------------------------------------------------
# (b) the fixed point is a stationary point of L + R on the rank-r manifold
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converged():
    # ρ large relative to the data scale / τ: the fixed-point map is then a contraction
    n, rank, rho, tau = 150, 2, 20.0, 1.0
    X, Y = two_view(n, d_x=6, d_y=5, seed=4, scale=0.5)
    model = paper_unicon(rank=rank, loss="clip", temperature=tau, similarity="dot", factorization="sqrt",
                      rho=rho, max_iter=200, tol=1e-10, dtype="float64").fit(X, Y)
    return model, X, Y, rank, rho, tau


def test_fixed_point_converges(converged):
    model, *_ = converged
    assert model.converged_
    assert model.n_iter_ < 200 and model.n_iter_ == len(model.history_)
    assert model.history_[-1]["residual"] <= 1e-10 and model.history_[-1]["delta_w"] < 1e-8


def test_fixed_point_tangent_residual_vanishes(converged):
    model, X, Y, rank, rho, tau = converged
    W = _W(model)
    assert np.linalg.matrix_rank(W, tol=1e-10 * np.abs(W).max()) == rank
    C = ud.weighted_cross_product(X, Y, X @ W, Y, loss="clip", temperature=tau)
    R = tangent_projection(rho * W - C, W, rank)
    assert np.linalg.norm(R) < 1e-7 * np.linalg.norm(C)
    # ... and W is not trivially zero / the residual outside the tangent space need not vanish
    assert np.linalg.norm(W) > 1e-3
    # the fixed point is W = [C]_r / ρ itself
    assert rel_err(W, svd_truncate(C, rank) / rho) < 1e-7


def test_fixed_point_stationary_by_autograd(converged):
    model, X, Y, rank, rho, tau = converged
    W = torch.tensor(_W(model), requires_grad=True)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    obj = ud.contrastive_loss(Xt @ W @ Yt.T, loss="clip", temperature=tau) + 0.5 * rho * (W**2).sum()
    (G,) = torch.autograd.grad(obj, W)
    G = G.numpy()
    R = tangent_projection(G, W.detach().numpy(), rank)
    assert np.linalg.norm(R) < 1e-7 * np.linalg.norm(rho * W.detach().numpy())
    # sanity: the full gradient is not zero (rank constraint is active), so the check is not vacuous
    assert np.linalg.norm(G) > 1e3 * np.linalg.norm(R)


def test_history_loss_matches_contrastive_loss(converged):
    model, X, Y, rank, rho, tau = converged
    W = _W(model)
    final = ud.contrastive_loss(X @ W @ Y.T, loss="clip", temperature=tau)
    losses = [h["loss"] for h in model.history_]
    assert all(np.isfinite(losses))
    # at convergence the recorded loss (at W_{k-1} or W_k, which agree) equals L(X W Yᵀ)
    assert losses[-1] == pytest.approx(final, rel=1e-8)


# --------------------------------------------------------------------------------------
# (c) API: history, encoders, similarity, retrieval
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy():
    X, Y = two_view(500, d_x=20, d_y=16, latent=6, noise=0.4, seed=10)
    return X[:300], Y[:300], X[300:], Y[300:]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_history_and_shapes(toy, dtype):
    X, Y, Xt, Yt = toy
    model = paper_unicon(rank=4, max_iter=3, tol=0.0, dtype=dtype).fit(X, Y)
    assert model.n_iter_ == len(model.history_) == 3
    for i, h in enumerate(model.history_):
        assert {"iteration", "loss", "delta_w", "seconds"} <= set(h)
        assert np.isfinite(h["loss"]) and h["delta_w"] >= 0 and h["seconds"] >= 0
    assert [h["iteration"] for h in model.history_] == sorted(h["iteration"] for h in model.history_)
    assert model.F1_.shape == (4, 20) and model.F2_.shape == (4, 16) and model.W_.shape == (20, 16)
    assert np.asarray(model.W_).dtype == np.float64
    ex, ey = np.asarray(model.encode_x(Xt)), np.asarray(model.encode_y(Yt[:50]))
    assert ex.shape == (200, 4) and ey.shape == (50, 4)
    # cosine (default): unit rows
    np.testing.assert_allclose(np.linalg.norm(ex, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ey, axis=1), 1.0, atol=1e-5)
    sim = np.asarray(model.similarity(Xt[:30], Yt[:50]))
    assert sim.shape == (30, 50)
    np.testing.assert_allclose(sim, ex[:30] @ ey.T, atol=1e-5)


def test_dot_encoders_are_linear_maps(toy):
    X, Y, Xt, Yt = toy
    model = paper_unicon(rank=3, similarity="dot", factorization="sqrt", max_iter=2, dtype="float64").fit(X, Y)
    F1, F2 = np.asarray(model.F1_), np.asarray(model.F2_)
    np.testing.assert_allclose(np.asarray(model.encode_x(Xt)), Xt @ F1.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(model.encode_y(Yt)), Yt @ F2.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(model.similarity(Xt, Yt)), Xt @ model.W_ @ Yt.T, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("max_iter, tau", [(1, 0.07), (4, 0.5)])
def test_retrieval_beats_random_projection(toy, max_iter, tau):
    X, Y, Xt, Yt = toy
    model = paper_unicon(rank=6, max_iter=max_iter, temperature=tau).fit(X, Y)
    fitted = ud.retrieval_metrics(np.asarray(model.encode_x(Xt)), np.asarray(model.encode_y(Yt)), ks=(1, 5))
    rng = np.random.default_rng(0)
    rand = ud.retrieval_metrics(Xt @ rng.standard_normal((20, 6)), Yt @ rng.standard_normal((16, 6)), ks=(1, 5))
    assert fitted["x2y_R@1"] > rand["x2y_R@1"] + 0.3
    assert fitted["y2x_R@1"] > rand["y2x_R@1"] + 0.3
    assert fitted["x2y_R@5"] > 0.8


def _reference_iteration(X, Y, rank, rho, tau, iters, cosine, orthonormal):
    """DESIGN §2's fixed point written densely: returns [L(s_0), L(s_1), ..., L(s_iters)]."""
    n = X.shape[0]
    F1 = F2 = None
    losses = [ud.contrastive_loss(np.zeros((n, n)), temperature=tau)]
    for _ in range(iters):
        if F1 is None:
            zx = zy = np.zeros((n, 1))
            px, py = X, Y
        else:
            zx, zy, px, py = X @ F1.T, Y @ F2.T, X, Y
            if cosine:
                nx, ny = np.linalg.norm(zx, axis=1), np.linalg.norm(zy, axis=1)
                zx, zy, px, py = zx / nx[:, None], zy / ny[:, None], X / nx[:, None], Y / ny[:, None]
        C = px.T @ ud.similarity_weights(zx @ zy.T, temperature=tau) @ py
        U, sv, Vt = np.linalg.svd(C)
        if orthonormal:
            F1, F2 = U[:, :rank].T, Vt[:rank]
        else:
            root = np.sqrt(sv[:rank] / rho)[:, None]
            F1, F2 = root * U[:, :rank].T, root * Vt[:rank]
        zx, zy = X @ F1.T, Y @ F2.T
        if cosine:
            zx = zx / np.linalg.norm(zx, axis=1, keepdims=True)
            zy = zy / np.linalg.norm(zy, axis=1, keepdims=True)
        losses.append(ud.contrastive_loss(zx @ zy.T, temperature=tau))
    return losses


@pytest.mark.parametrize("similarity, factorization, rho, tau", [
    ("dot", "sqrt", 3.0, 0.5), ("cosine", "orthonormal", 1.0, 0.2), ("cosine", "sqrt", 2.0, 0.3),
])
def test_iterates_follow_reference_fixed_point(toy, similarity, factorization, rho, tau):
    """The recorded per-iteration losses are those of an independent dense implementation."""
    X, Y, _, _ = toy
    X, Y = X[:120], Y[:120]
    iters = 3
    model = paper_unicon(rank=3, similarity=similarity, factorization=factorization, rho=rho, temperature=tau,
                      max_iter=iters, tol=0.0, dtype="float64").fit(X, Y)
    got = [h["loss"] for h in model.history_]
    ref = _reference_iteration(X, Y, 3, rho, tau, iters, similarity == "cosine", factorization == "orthonormal")
    assert len(got) == iters
    # the loss of iteration k may be recorded before (s_{k-1}) or after (s_k) its step
    assert np.allclose(got, ref[:iters], rtol=1e-8) or np.allclose(got, ref[1:], rtol=1e-8), (got, ref)
    assert len(set(np.round(ref, 6))) > 2  # the iterates really move


def test_fit_is_deterministic(toy):
    X, Y, _, _ = toy
    a = paper_unicon(rank=3, max_iter=3, negatives=64, seed=5).fit(X, Y)
    b = paper_unicon(rank=3, max_iter=3, negatives=64, seed=5).fit(X, Y)
    np.testing.assert_array_equal(np.asarray(a.W_), np.asarray(b.W_))


def test_orthonormal_factors(toy):
    X, Y, _, _ = toy
    model = paper_unicon(rank=4, max_iter=2, factorization="orthonormal", dtype="float64").fit(X, Y)
    F1, F2 = np.asarray(model.F1_, dtype=np.float64), np.asarray(model.F2_, dtype=np.float64)
    np.testing.assert_allclose(F1 @ F1.T, np.eye(4), atol=1e-10)
    np.testing.assert_allclose(F2 @ F2.T, np.eye(4), atol=1e-10)


# --------------------------------------------------------------------------------------
# (d) persistence
# --------------------------------------------------------------------------------------
def test_save_is_one_atomic_file(tmp_path, toy, monkeypatch):
    """``save(path)`` writes a single file by write-then-rename: a save that fails midway
    leaves the previous model readable and no temporary file behind."""
    X, Y, Xt, _ = toy
    path = tmp_path / "model.npz"
    first = paper_unicon(rank=2, max_iter=1).fit(X, Y)
    first.save(path)
    assert path.is_file()
    second = paper_unicon(rank=3, max_iter=1).fit(X, Y)

    def broken_savez(fh, **arrays):
        fh.write(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        second.save(path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["model.npz"]
    loaded = ud.UniCon.load(path)
    assert loaded.rank == 2
    np.testing.assert_array_equal(np.asarray(loaded.encode_x(Xt)), np.asarray(first.encode_x(Xt)))


def _written_files(path):
    if os.path.isdir(path):
        return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    return [str(path)]


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_save_load_round_trip(tmp_path, toy, similarity):
    X, Y, Xt, Yt = toy
    model = paper_unicon(rank=3, max_iter=2, similarity=similarity, loss="sigmoid", temperature=0.2,
                      negatives=100, ridge=0.1).fit(X[:150], Y[:150])
    path = tmp_path / "model"
    model.save(path)
    loaded = ud.UniCon.load(path)
    np.testing.assert_array_equal(np.asarray(loaded.encode_x(Xt)), np.asarray(model.encode_x(Xt)))
    np.testing.assert_array_equal(np.asarray(loaded.encode_y(Yt)), np.asarray(model.encode_y(Yt)))
    np.testing.assert_allclose(np.asarray(loaded.W_), np.asarray(model.W_), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(loaded.similarity(Xt[:9], Yt[:7])),
                                  np.asarray(model.similarity(Xt[:9], Yt[:7])))
    assert loaded.rank == 3 and loaded.similarity == similarity and loaded.negatives == 100
    assert len(loaded.history_) == len(model.history_)
    # no pickles anywhere: every .npz loads with allow_pickle=False, JSON is JSON
    files = _written_files(path)
    n_npz = 0
    for f in files:
        assert not f.endswith((".pkl", ".pickle", ".pt", ".tmp"))
        with open(f, "rb") as fh:
            is_zip = fh.read(2) == b"PK"
        if is_zip or f.endswith(".npz"):
            n_npz += 1
            with np.load(f, allow_pickle=False) as z:
                for key in z.files:
                    assert z[key].dtype != object
        elif f.endswith(".json"):
            with open(f) as fh:
                json.load(fh)
    assert n_npz >= 1
    # no temporary files left next to the artifact
    assert [p for p in os.listdir(tmp_path) if p != "model"] == []


def test_save_overwrites_atomically(tmp_path, toy):
    X, Y, Xt, _ = toy
    path = tmp_path / "m"
    paper_unicon(rank=2, max_iter=1).fit(X, Y).save(path)
    m2 = paper_unicon(rank=4, max_iter=1).fit(X, Y)
    m2.save(path)
    loaded = ud.UniCon.load(path)
    assert np.asarray(loaded.encode_x(Xt)).shape == (Xt.shape[0], 4)
    np.testing.assert_array_equal(np.asarray(loaded.encode_x(Xt)), np.asarray(m2.encode_x(Xt)))


# --------------------------------------------------------------------------------------
# (e) many-to-many and batched negatives
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["clip", "triplet", "sigmoid"])
@pytest.mark.parametrize("negatives", ["full", 70])
def test_fit_with_groups_and_batches(toy, loss, negatives):
    X, Y, _, _ = toy
    X, Y = X[:200], Y[:200]
    groups = uneven_groups([1, 2, 3, 4] * 20, rng=np.random.default_rng(1), shuffle=True)
    model = paper_unicon(rank=3, loss=loss, temperature=0.2, negatives=negatives, max_iter=3).fit(X, Y, groups=groups)
    W = np.asarray(model.W_)
    assert W.shape == (20, 16) and np.all(np.isfinite(W)) and np.abs(W).max() > 0
    assert all(np.isfinite(h["loss"]) for h in model.history_)


def _two_cycle_data(n=1200, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 12, n)
    centres = rng.standard_normal((12, 16))
    rotation = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    X = (centres[c] + 0.6 * rng.standard_normal((n, 16))).astype(np.float32)
    Y = (centres[c] @ rotation + 0.6 * rng.standard_normal((n, 16))).astype(np.float32)
    return X, Y


def test_damping_breaks_the_two_cycle_and_keeps_the_fixed_point():
    """The plain map settles into W_k = W_{k-2} != W_{k-1} here; with damping it converges to
    a point the plain map leaves where it is (a fixed point of W -> [C(W)]_r / rho)."""
    import torch

    from unicon_dist.math.closed_form import closed_form_step

    X, Y = _two_cycle_data()
    params = dict(rank=6, temperature=0.5, factorization="sqrt", max_iter=60, tol=1e-6)
    plain = paper_unicon(**params).fit(X, Y)
    assert not plain.converged_
    damped = paper_unicon(**params, damping=0.5).fit(X, Y)
    assert damped.converged_
    # one undamped step from the damped fixed point returns it
    phi_x, phi_y = torch.as_tensor(X), torch.as_tensor(Y)
    zs = embed(phi_x, phi_y, torch.as_tensor(damped.F1_), torch.as_tensor(damped.F2_), str(damped.similarity))
    op = ud.CrossProductOperator(*zs, loss=damped.loss_fn_, negatives=damped.negatives)
    F1, F2 = closed_form_step(op.materialize(), 6, 1.0, 0.0, "sqrt")
    W_next = (F1.T @ F2).numpy()
    assert np.linalg.norm(W_next - damped.W_) / np.linalg.norm(damped.W_) < 1e-4


@pytest.mark.parametrize("damping", [0, -0.5, 1.5, True, "half"])
def test_damping_is_validated(damping):
    X, Y = _two_cycle_data(n=50)
    with pytest.raises(ValueError, match="damping must be a number in"):
        paper_unicon(rank=2, damping=damping).fit(X, Y)


def test_the_default_solver_reaches_a_certified_fixed_point_where_the_plain_map_cycles():
    """The defaults (whitened views, Anderson mixing over damped sqrt steps) on data where the
    paper's plain map cycles: "converged" means the residual is below tol, and a dense
    float64 evaluation of the map at the kept encoders confirms it."""
    from unicon_dist.data.rows import features
    from unicon_dist.math.closed_form import fixed_point_residual, truncated_svd

    X, Y = _two_cycle_data()
    plain = paper_unicon(rank=6, temperature=0.5, factorization="sqrt", max_iter=30, tol=1e-6).fit(X, Y)
    assert not plain.converged_ and min(h["residual"] for h in plain.history_) > 0.1
    model = ud.UniCon(rank=6, temperature=0.5).fit(X, Y)
    assert model.stop_reason_ == "converged" and model.n_iter_ <= 20
    assert model.history_[-1]["residual"] <= 1e-5 and model.best_iteration_ == model.n_iter_
    # C(W) in float64 from scratch: cosine linearisation (rows of Φ over ‖f‖), dense S(γ)
    F1, F2 = torch.as_tensor(model.F1_), torch.as_tensor(model.F2_)
    phi_x = features(torch.as_tensor(X, dtype=torch.float64), model.map_x_, torch.float64)
    phi_y = features(torch.as_tensor(Y, dtype=torch.float64), model.map_y_, torch.float64)
    zx, zy = phi_x @ F1.T, phi_y @ F2.T
    tx, ty = phi_x / zx.norm(dim=1, keepdim=True), phi_y / zy.norm(dim=1, keepdim=True)
    s = (zx / zx.norm(dim=1, keepdim=True)) @ (zy / zy.norm(dim=1, keepdim=True)).T
    C = tx.T @ torch.as_tensor(ud.similarity_weights(s, temperature=0.5), dtype=torch.float64) @ ty
    # float32 tiles against float64: the residuals agree to ~1e-6, far below the tol of 1e-5
    assert fixed_point_residual(C, F1, F2, 1.0, "sqrt", "cosine") <= 2e-5
    # whether W is also a fixed point of the *plain* map (W's subspaces C's leading ones) is
    # recorded, not certified: the damped map converges to any stationary point
    U, sv, Vh = truncated_svd(C, 6)
    T = (U * sv) @ Vh
    W = F1.T @ F2
    plain_gap = float(torch.linalg.norm(T / T.norm() - W / W.norm()))
    assert model.history_[-1]["map_residual"] == pytest.approx(plain_gap, rel=1e-3, abs=1e-5)
