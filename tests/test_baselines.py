"""The comparison baselines: regularised CCA, SGD-trained CLIP heads, batch-averaged UniCon."""

import numpy as np
import pytest
import scipy.linalg
import torch

import unicon_dist as ud
from unicon_dist.baselines import SGDCLIP, BatchAveragedUniCon, RegularizedCCA, sgd_clip_sweep
from unicon_dist.baselines import batch_average
from unicon_dist.baselines.sgd_clip import clip_loss
from unicon_dist.apps.evaluation import evaluate_arrays


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These fits are tiny: one intra-op thread avoids OpenMP spinning on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def two_view(n, d_x=10, d_y=8, latent=3, noise=0.3, seed=0, shift=(0.5, -0.3)):
    """Both views noisy linear images of a shared latent code, with non-zero means."""
    rng = np.random.default_rng(seed)
    maps = np.random.default_rng(1000)
    A, B = maps.standard_normal((latent, d_x)), maps.standard_normal((latent, d_y))
    Z = rng.standard_normal((n, latent))
    X = Z @ A + noise * rng.standard_normal((n, d_x)) + shift[0]
    Y = Z @ B + noise * rng.standard_normal((n, d_y)) + shift[1]
    return X, Y


def unit_rows(Z):
    np.testing.assert_allclose(np.linalg.norm(np.asarray(Z, dtype=np.float64), axis=1), 1.0, atol=1e-5)


def mean_r1(zx, zy):
    m = ud.retrieval_metrics(zx, zy, ks=(1,))
    return 0.5 * (m["x2y_R@1"] + m["y2x_R@1"])


# ======================================================================================
# RegularizedCCA
# ======================================================================================
def reference_cca(X, Y, ridge, rank, center=True):
    """Top generalised eigenpairs of [[0, Σxy], [Σyx, 0]] v = ρ [[Kx, 0], [0, Ky]] v (scipy)."""
    n, dx = X.shape
    Xc = X - X.mean(0) if center else X
    Yc = Y - Y.mean(0) if center else Y
    Sxx, Syy, Sxy = Xc.T @ Xc / n, Yc.T @ Yc / n, Xc.T @ Yc / n
    Kx = Sxx + ridge * np.trace(Sxx) / dx * np.eye(dx)
    Ky = Syy + ridge * np.trace(Syy) / Y.shape[1] * np.eye(Y.shape[1])
    A = np.block([[np.zeros_like(Sxx), Sxy], [Sxy.T, np.zeros_like(Syy)]])
    Bm = scipy.linalg.block_diag(Kx, Ky)
    evals, V = scipy.linalg.eigh(A, Bm)
    top = np.argsort(evals)[::-1][:rank]
    return evals[top], V[:dx, top], V[dx:, top], Kx, Ky


@pytest.mark.parametrize("n, d_x, d_y, ridge, center", [
    (80, 6, 5, 1e-3, True),
    (30, 40, 12, 0.1, True),   # d_x > n: only the ridge makes the whitening defined
    (50, 7, 9, 1e-2, False),
])
def test_cca_matches_generalized_eigenproblem(n, d_x, d_y, ridge, center):
    rank = 4
    X, Y = two_view(n, d_x, d_y, latent=3, noise=0.5, seed=3)
    model = RegularizedCCA(rank=rank, ridge=ridge, center=center)
    assert model.fit(X, Y) is model
    rho, a, b, Kx, Ky = reference_cca(X, Y, ridge, rank, center)
    assert model.Wx_.shape == (d_x, rank) and model.Wy_.shape == (d_y, rank)
    np.testing.assert_allclose(model.correlations_, rho, rtol=0, atol=1e-8)
    # the same canonical subspaces ...
    assert np.max(scipy.linalg.subspace_angles(model.Wx_, a)) < 1e-6
    assert np.max(scipy.linalg.subspace_angles(model.Wy_, b)) < 1e-6
    # ... and the same directions: v is B-normalised, so each half has norm² 1/2 in its K
    for W, V in ((model.Wx_, a), (model.Wy_, b)):
        for i in range(rank):
            sign = np.sign(W[:, i] @ V[:, i])
            np.testing.assert_allclose(W[:, i], sign * np.sqrt(2) * V[:, i], rtol=0, atol=1e-6 * np.abs(W).max())
    np.testing.assert_allclose(model.Wx_.T @ Kx @ model.Wx_, np.eye(rank), atol=1e-8)
    np.testing.assert_allclose(model.Wy_.T @ Ky @ model.Wy_, np.eye(rank), atol=1e-8)
    if center:
        np.testing.assert_allclose(model.mean_x_, X.mean(0), atol=1e-12)
    else:
        assert not model.mean_x_.any()


def test_cca_recovers_planted_correlation():
    """One planted canonical pair of correlation 0.8 hidden by random mixing and scaling."""
    rng = np.random.default_rng(7)
    n, d, rho = 2000, 10, 0.8
    z = rng.standard_normal(n)
    Sx, Sy = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    Sx[:, 0] = np.sqrt(rho) * z + np.sqrt(1 - rho) * rng.standard_normal(n)
    Sy[:, 0] = np.sqrt(rho) * z + np.sqrt(1 - rho) * rng.standard_normal(n)
    Qx = np.linalg.qr(rng.standard_normal((d, d)))[0] * rng.uniform(0.1, 10.0, d)
    Qy = np.linalg.qr(rng.standard_normal((d, d)))[0] * rng.uniform(0.1, 10.0, d)
    X, Y = Sx @ Qx + 3.0, Sy @ Qy - 2.0
    model = RegularizedCCA(rank=3, ridge=1e-4).fit(X, Y)
    assert abs(model.correlations_[0] - rho) < 0.03
    assert model.correlations_[1] < 0.15
    # the top canonical variate of x is the planted coordinate (up to sign)
    u = (X - model.mean_x_) @ model.Wx_[:, 0]
    assert abs(np.corrcoef(u, Sx[:, 0])[0, 1]) > 0.99


def test_cca_encoders():
    X, Y = two_view(200, seed=4)
    model = RegularizedCCA(rank=3).fit(X, Y)
    zx, zy = model.encode_x(X), model.encode_y(Y)
    assert zx.shape == (200, 3) and zx.dtype == np.float64
    unit_rows(zx), unit_rows(zy)
    ref = (X - X.mean(0)) @ model.Wx_
    np.testing.assert_allclose(zx, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-12)
    # torch in, torch out; float32 in, float32 out
    zt = model.encode_x(torch.as_tensor(X, dtype=torch.float32))
    assert isinstance(zt, torch.Tensor) and zt.dtype == torch.float32
    np.testing.assert_allclose(zt.numpy(), zx, atol=1e-5)
    assert mean_r1(zx, zy) > 0.2  # far above chance (1/200)
    # float32 training input gives the same model (computed in float64)
    m32 = RegularizedCCA(rank=3).fit(X.astype(np.float32), torch.as_tensor(Y, dtype=torch.float32))
    np.testing.assert_allclose(m32.correlations_, model.correlations_, atol=1e-5)


def test_cca_errors():
    X, Y = two_view(20, seed=5)
    with pytest.raises(ValueError, match="mismatched number of rows: X has 20, Y has 19"):
        RegularizedCCA(rank=2).fit(X, Y[:19])
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="X holds NaN or Inf in 1 row"):
        RegularizedCCA(rank=2).fit(bad, Y)
    with pytest.raises(ValueError, match=r"rank=9 exceeds min\(d_x, d_y\)"):
        RegularizedCCA(rank=9).fit(X, Y)
    for ridge in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="ridge must be a finite number > 0"):
            RegularizedCCA(rank=2, ridge=ridge).fit(X, Y)
    with pytest.raises(ValueError, match="Y has no variance"):
        RegularizedCCA(rank=2).fit(X, np.ones_like(Y))
    with pytest.raises(RuntimeError, match="not fitted"):
        RegularizedCCA().encode_x(X)
    model = RegularizedCCA(rank=2).fit(X, Y)
    with pytest.raises(ValueError, match="Y has 10 features, the model was fitted on 8"):
        model.encode_y(X)


# ======================================================================================
# SGDCLIP
# ======================================================================================
def test_clip_loss_is_contrastive_loss_over_tau():
    """clip_loss = ½[CE(s/τ) + CE(sᵀ/τ)] = ud.contrastive_loss(s, "clip", τ) / τ."""
    rng = np.random.default_rng(0)
    zx = torch.nn.functional.normalize(torch.as_tensor(rng.standard_normal((40, 5))), dim=1)
    zy = torch.nn.functional.normalize(torch.as_tensor(rng.standard_normal((40, 5))), dim=1)
    for tau in (0.03, 0.07, 0.5):
        ours = float(clip_loss(zx, zy, tau))
        ref = ud.contrastive_loss((zx @ zy.T).numpy(), loss="clip", temperature=tau)
        assert ours == pytest.approx(ref / tau, rel=1e-12)


def test_sgd_training_loss_is_the_clip_loss_of_the_batch():
    """With one batch per epoch, epoch 2's training loss is the loss of the whole training set
    at the weights after epoch 1 (which a 1-epoch fit keeps) -- against ud.contrastive_loss."""
    X, Y = two_view(150, seed=6)
    Xv, Yv = two_view(40, seed=7)
    tau = 0.1
    opts = dict(rank=3, temperature=tau, lr=1e-2, batch_size=1000, validation=(Xv, Yv), dtype="float64", seed=3)
    one = SGDCLIP(max_epochs=1, **opts).fit(X, Y)
    two = SGDCLIP(max_epochs=2, patience=None, **opts).fit(X, Y)
    s = one.encode_x(X) @ one.encode_y(Y).T
    ref = ud.contrastive_loss(s, loss="clip", temperature=tau) / tau
    assert two.history_[1]["train_loss"] == pytest.approx(ref, rel=1e-10)
    # and the validation loss is the same loss over the validation pairs (one batch here)
    sv = one.encode_x(Xv) @ one.encode_y(Yv).T
    assert one.history_[0]["val_loss"] == pytest.approx(ud.contrastive_loss(sv, temperature=tau) / tau, rel=1e-10)
    assert one.history_[0]["val_R@1"] == pytest.approx(mean_r1(one.encode_x(Xv), one.encode_y(Yv)))


def test_sgd_clip_learns_and_is_deterministic():
    X, Y = two_view(1000, d_x=16, d_y=12, latent=4, seed=8)
    opts = dict(rank=4, lr=1e-2, batch_size=128, max_epochs=12, patience=None, validation=0.2, seed=1)
    model = SGDCLIP(**opts).fit(X, Y)
    h = model.history_
    assert [e["epoch"] for e in h] == list(range(1, 13)) and model.n_epochs_ == 12
    assert set(h[0]) == {"epoch", "train_loss", "val_loss", "val_R@1", "seconds"}
    losses = [e["train_loss"] for e in h]
    assert losses[-1] < 0.5 * losses[0]
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 9  # decreasing, up to SGD noise
    assert model.n_val_ == 200 and model.n_train_ == 800
    assert len(model.validation_rows_) == 200 and not set(model.validation_rows_) & set(model.train_rows_)
    random_r1 = 1.0 / 200
    assert model.best_score_ > 40 * random_r1
    assert model.best_score_ == max(e["val_R@1"] for e in h)
    assert h[model.best_epoch_ - 1]["val_R@1"] == model.best_score_
    # the kept weights are those scored: encoding the validation rows reproduces the score
    Xv, Yv = X[model.validation_rows_], Y[model.validation_rows_]
    assert mean_r1(model.encode_x(Xv), model.encode_y(Yv)) == pytest.approx(model.best_score_)
    np.testing.assert_allclose(model.mean_x_, X[model.train_rows_].mean(0), atol=1e-5)
    unit_rows(model.encode_x(X))
    assert model.Wx_.shape == (16, 4) and model.Wy_.shape == (12, 4)
    # same seed: the same model, bit for bit; another seed: another one
    again = SGDCLIP(**opts).fit(X, Y)
    np.testing.assert_array_equal(again.Wx_, model.Wx_)
    np.testing.assert_array_equal(again.Wy_, model.Wy_)
    assert [e["train_loss"] for e in again.history_] == losses
    other = SGDCLIP(**{**opts, "seed": 2}).fit(X, Y)
    assert not np.array_equal(other.Wx_, model.Wx_)


def overfit_data(n, seed, d=48, latent=2, noise=1.0):
    rng = np.random.default_rng(seed)
    maps = np.random.default_rng(100)
    A, B = maps.standard_normal((latent, d)), maps.standard_normal((latent, d))
    Z = rng.standard_normal((n, latent))
    return Z @ A + noise * rng.standard_normal((n, d)), Z @ B + noise * rng.standard_normal((n, d))


def test_sgd_clip_early_stopping_restores_best_epoch():
    """48 training pairs in 48 dimensions and a weak rank-2 signal: 32-dim heads soon fit the
    noise, validation R@1 peaks after a few epochs and then stalls, and training stops."""
    X, Y = overfit_data(48, seed=0)
    val = overfit_data(200, seed=1)
    opts = dict(rank=32, lr=1e-2, temperature=0.05, batch_size=48, validation=val, seed=0)
    patience, max_epochs = 5, 100
    model = SGDCLIP(max_epochs=max_epochs, patience=patience, **opts).fit(X, Y)
    scores = [e["val_R@1"] for e in model.history_]
    best = int(np.argmax(scores)) + 1  # the first epoch with the highest score
    assert model.best_epoch_ == best and best >= 2
    assert model.stopped_early_ and model.n_epochs_ == best + patience < max_epochs
    assert all(s <= scores[best - 1] for s in scores[best:])
    # the restored weights are the best epoch's: a fit stopped there has the same weights
    # (the run is deterministic), and they differ from the last epoch's
    at_best = SGDCLIP(max_epochs=best, patience=None, **opts).fit(X, Y)
    np.testing.assert_array_equal(model.Wx_, at_best.Wx_)
    np.testing.assert_array_equal(model.Wy_, at_best.Wy_)
    # without validation the last epoch is kept (validation changes nothing else of the run)
    last = SGDCLIP(max_epochs=model.n_epochs_, patience=None, **{**opts, "validation": None}).fit(X, Y)
    assert [e["train_loss"] for e in last.history_] == [e["train_loss"] for e in model.history_]
    assert not np.array_equal(last.Wx_, model.Wx_)
    assert mean_r1(model.encode_x(val[0]), model.encode_y(val[1])) == pytest.approx(scores[best - 1])


def test_sgd_clip_learned_temperature_and_no_validation():
    X, Y = two_view(300, seed=9)
    model = SGDCLIP(rank=3, lr=1e-2, batch_size=100, max_epochs=3, validation=None,
                    learn_temperature=True).fit(torch.as_tensor(X), torch.as_tensor(Y))
    assert model.temperature_ != 0.07 and 0 < model.temperature_ < 1
    assert model.best_epoch_ == model.n_epochs_ == 3 and model.best_score_ is None
    assert all(e["val_loss"] is None and e["val_R@1"] is None for e in model.history_)
    assert model.train_rows_ is None and model.n_train_ == 300
    fixed = SGDCLIP(rank=3, lr=1e-2, batch_size=100, max_epochs=2, validation=None).fit(X, Y)
    assert fixed.temperature_ == pytest.approx(0.07)


def test_sgd_clip_sweep():
    X, Y = two_view(400, seed=10)
    best, table = sgd_clip_sweep(X, Y, lrs=(1e-3, 1e-2), temperatures=(0.1, 0.3), validation=0.25,
                                 rank=3, batch_size=100, max_epochs=4, seed=2)
    assert [(r["lr"], r["temperature"]) for r in table] == [(1e-3, 0.1), (1e-3, 0.3), (1e-2, 0.1), (1e-2, 0.3)]
    assert set(table[0]) == {"lr", "temperature", "val_R@1", "epochs", "best_epoch", "seconds"}
    top = max(r["val_R@1"] for r in table)
    first = next(r for r in table if r["val_R@1"] == top)
    assert best.best_score_ == top and (best.lr, best.temperature) == (first["lr"], first["temperature"])
    # every combination saw the same split: the one SGDCLIP(validation=0.25, seed=2) draws
    ref = SGDCLIP(rank=3, validation=0.25, seed=2, max_epochs=1, batch_size=100).fit(X, Y)
    Xv, Yv = best.validation
    np.testing.assert_array_equal(np.asarray(Xv), X[ref.validation_rows_])
    np.testing.assert_array_equal(np.asarray(Yv), Y[ref.validation_rows_])
    assert best.n_train_ == ref.n_train_ == 300
    with pytest.raises(ValueError, match="lr= is swept"):
        sgd_clip_sweep(X, Y, lr=1e-3)
    with pytest.raises(ValueError, match="needs validation"):
        sgd_clip_sweep(X, Y, validation=None)


def test_sgd_clip_errors():
    X, Y = two_view(30, seed=11)
    cases = [
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(temperature=-0.1), "temperature must be a finite number > 0"),
        (dict(lr=0), "lr must be a finite number > 0"),
        (dict(weight_decay=-1e-4), "weight_decay must be a finite number >= 0"),
        (dict(batch_size=1), "batch_size must be an integer >= 2"),
        (dict(max_epochs=0), "max_epochs must be an integer >= 1"),
        (dict(patience=0), "patience must be an integer >= 1"),
        (dict(validation=1.5), "validation must be a fraction in"),
        (dict(validation=0.01), "holds out 0 of 30 pairs"),
        (dict(validation=(X[:5], Y[:5, :3])), "validation Y_val has 3 features, the training view has 8"),
        (dict(validation=(X[:5], Y[:4])), "mismatched number of rows: validation X_val has 5"),
        (dict(dtype="float16"), "dtype must be 'float32' or 'float64'"),
        (dict(rank=9), r"rank=9 exceeds min\(d_x, d_y\)"),
        (dict(device="nonsense"), "invalid device"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            SGDCLIP(**{"rank": 2, **kwargs}).fit(X, Y)
    bad = Y.copy()
    bad[7] = np.inf
    with pytest.raises(ValueError, match="Y holds NaN or Inf in 1 row"):
        SGDCLIP(rank=2).fit(X, bad)
    with pytest.raises(ValueError, match="mismatched number of rows"):
        SGDCLIP(rank=2).fit(X[:10], Y)
    with pytest.raises(RuntimeError, match="not fitted"):
        SGDCLIP().encode_y(Y)


def test_params_and_repr():
    model = SGDCLIP(rank=8, lr=3e-3)
    assert model.get_params()["lr"] == 3e-3 and model.get_params()["rank"] == 8
    assert repr(model) == "SGDCLIP(rank=8, lr=0.003)"
    clone = SGDCLIP(**model.get_params())
    assert clone.get_params() == model.get_params()
    with pytest.raises(ValueError, match="unknown parameter 'foo'"):
        model.set_params(foo=1)
    bav = BatchAveragedUniCon(rank=4, batch_size=64, temperature=0.2)
    assert bav.get_params()["temperature"] == 0.2 and bav.unicon_options == {"temperature": 0.2}
    assert BatchAveragedUniCon(**bav.get_params()).get_params() == bav.get_params()
    assert "temperature=0.2" in repr(bav)


# ======================================================================================
# BatchAveragedUniCon
# ======================================================================================
UNICON = dict(temperature=0.2, max_iter=4, damping=0.5, dtype="float64")


@pytest.mark.parametrize("factorization", ["orthonormal", "sqrt"])
def test_one_batch_equals_unicon(factorization):
    X, Y = two_view(300, seed=12)
    val = two_view(50, seed=13)
    opts = dict(UNICON, factorization=factorization)
    bav = BatchAveragedUniCon(rank=3, batch_size=300, validation=val, seed=4, **opts).fit(X, Y)
    ref = ud.UniCon(rank=3, seed=4, center=False, whiten=None, **opts).fit(X, Y)
    assert bav.n_batches_ == 1 and bav.weights_.tolist() == [1.0]
    np.testing.assert_array_equal(bav.batch_rows_[0], np.arange(300))
    for A, enc, ref_enc in ((X, bav.encode_x, ref.encode_x), (Y, bav.encode_y, ref.encode_y)):
        np.testing.assert_allclose(enc(A), ref_enc(A), rtol=0, atol=1e-6)
    np.testing.assert_allclose(bav.W_mean_, ref.W_, atol=1e-12)
    assert bav.history_[0]["score"] == pytest.approx(mean_r1(ref.encode_x(val[0]), ref.encode_y(val[1])))


def _refit_batch_maps(model, X, Y, **opts):
    maps = []
    for rows in model.batch_rows_:
        m = ud.UniCon(rank=model.rank, seed=model.seed, center=False, whiten=None, **opts).fit(X[rows], Y[rows])
        maps.append((m, m.F1_.T @ m.F2_))
    return maps


def test_batch_weights_and_average(monkeypatch):
    """Scripted validation scores: w = score / Σ score, or 1/B; W̄ = Σ w_b W_b; encoders from [W̄]_r."""
    X, Y = two_view(360, seed=14)
    rank = 2
    scripted = iter([0.2, 0.6, 0.0] * 4)
    monkeypatch.setattr(batch_average, "retrieval_score", lambda zx, zy: next(scripted))
    fits = {}
    for weighting, factorization in (("validation", "orthonormal"), ("uniform", "orthonormal"),
                                     ("validation", "sqrt")):
        opts = dict(UNICON, factorization=factorization)
        fits[weighting, factorization] = BatchAveragedUniCon(
            rank=rank, batch_size=120, validation=0.25, weighting=weighting, seed=5, **opts).fit(X, Y)
    model = fits["validation", "orthonormal"]
    assert model.n_batches_ == 3 and [h["rows"] for h in model.history_] == [90, 90, 90]
    np.testing.assert_allclose(model.scores_, [0.2, 0.6, 0.0])
    np.testing.assert_allclose(model.weights_, [0.25, 0.75, 0.0])
    assert [h["weight"] for h in model.history_] == pytest.approx([0.25, 0.75, 0.0])
    np.testing.assert_allclose(fits["uniform", "orthonormal"].weights_, [1 / 3] * 3)
    # the batches partition the training rows; validation rows are not trained on
    rows = np.concatenate(model.batch_rows_)
    assert len(rows) == 270 and len(set(rows)) == 270
    assert not set(rows) & set(model.validation_rows_) and len(model.validation_rows_) == 90
    for (weighting, factorization), fit in fits.items():
        maps = _refit_batch_maps(fit, X, Y, **dict(UNICON, factorization=factorization))
        W_mean = sum(w * W for w, (_, W) in zip(fit.weights_, maps))
        np.testing.assert_allclose(fit.W_mean_, W_mean, atol=1e-10)
        U, s, Vh = np.linalg.svd(W_mean)
        expected = U[:, :rank] @ (Vh[:rank] if factorization == "orthonormal" else s[:rank, None] * Vh[:rank])
        np.testing.assert_allclose(fit.W_, expected, atol=1e-10)
        np.testing.assert_allclose(fit.singular_values_, s[:rank], atol=1e-12)
        z = fit.encode_x(X)
        unit_rows(z)
        ref = X @ fit.F1_.T
        np.testing.assert_allclose(z, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-12)
    # every score 0: uniform weights, and the fit says so
    monkeypatch.setattr(batch_average, "retrieval_score", lambda zx, zy: 0.0)
    zero = BatchAveragedUniCon(rank=rank, batch_size=120, validation=0.25, seed=5, factorization="orthonormal", **UNICON).fit(X, Y)
    assert zero.weighting_.startswith("uniform") and zero.weights_.tolist() == pytest.approx([1 / 3] * 3)
    np.testing.assert_allclose(zero.W_mean_, fits["uniform", "orthonormal"].W_mean_, atol=1e-12)


def test_batch_scores_and_determinism():
    X, Y = two_view(400, seed=15)
    val = two_view(60, seed=16)
    opts = dict(rank=3, batch_size=150, validation=val, seed=6, **UNICON)
    model = BatchAveragedUniCon(**opts).fit(X, Y)
    assert model.n_batches_ == 3 and model.validation_rows_ is None
    assert max(len(r) for r in model.batch_rows_) <= 150
    maps = _refit_batch_maps(model, X, Y, **UNICON)
    scores = [mean_r1(m.encode_x(val[0]), m.encode_y(val[1])) for m, _ in maps]
    np.testing.assert_allclose(model.scores_, scores)
    np.testing.assert_allclose(model.weights_, np.array(scores) / sum(scores))
    assert set(model.history_[0]) == {"batch", "rows", "score", "weight", "seconds", "n_iter", "converged"}
    again = BatchAveragedUniCon(**opts).fit(X, Y)
    np.testing.assert_array_equal(again.F1_, model.F1_)
    np.testing.assert_array_equal(again.F2_, model.F2_)
    for a, b in zip(again.batch_rows_, model.batch_rows_):
        np.testing.assert_array_equal(a, b)
    other = BatchAveragedUniCon(**{**opts, "seed": 7}).fit(X, Y)
    assert not np.array_equal(other.batch_rows_[0], model.batch_rows_[0])
    # averaging per-batch maximisers is not the global solve
    glob = ud.UniCon(rank=3, seed=6, center=False, whiten=None, **UNICON).fit(X, Y)
    assert np.linalg.norm(glob.W_ - model.W_) > 1e-3


def test_batch_average_errors():
    X, Y = two_view(40, seed=17)
    cases = [
        (dict(kernel="rbf"), "linear kernel only"),
        (dict(kernel_y="laplacian"), "linear kernel only"),
        (dict(n_landmarks=10), "linear kernel only"),
        (dict(weighting="best"), "weighting must be one of"),
        (dict(validation=None), "weighting='validation' needs validation"),
        (dict(foo=1), "unknown UniCon option 'foo'"),
        (dict(batch_size=1), "batch_size must be an integer >= 2"),
        (dict(rank=9), r"rank=9 exceeds min\(d_x, d_y\)"),
        (dict(factorization="cholesky"), "factorization must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            BatchAveragedUniCon(**{"rank": 2, **kwargs}).fit(X, Y)
    # 39 training pairs in batches of at most 3: 13 batches of 3; at most 2: a batch of 1
    tiny = dict(rank=2, validation=(X, Y), max_iter=1)
    assert BatchAveragedUniCon(batch_size=3, **tiny).fit(X[:39], Y[:39]).n_batches_ == 13
    with pytest.raises(ValueError, match="batch_size=2 splits 39 training pairs into batches of fewer than 2"):
        BatchAveragedUniCon(batch_size=2, **tiny).fit(X[:39], Y[:39])
    model = BatchAveragedUniCon(rank=2, weighting="uniform", validation=None, max_iter=1).fit(X, Y)
    assert model.scores_ is None and model.history_[0]["score"] is None
    with pytest.raises(ValueError, match="X holds NaN"):
        BatchAveragedUniCon(rank=2).fit(np.full_like(X, np.nan), Y)
    with pytest.raises(RuntimeError, match="not fitted"):
        BatchAveragedUniCon().encode_x(X)


# ======================================================================================
# evaluation of any fitted encoder
# ======================================================================================
def test_evaluation_accepts_baselines():
    X, Y = two_view(120, seed=18)
    model = RegularizedCCA(rank=3).fit(X, Y)
    res = evaluate_arrays(model, X, Y, baseline=False)
    m = ud.retrieval_metrics(model.encode_x(X).astype(np.float32), model.encode_y(Y).astype(np.float32))
    assert res["retrieval"]["instance"][res["methods"][0]] == m
    with pytest.raises(RuntimeError, match="not fitted"):
        evaluate_arrays(SGDCLIP(), X, Y)
    # UniCon as before
    unicon = ud.UniCon(rank=3, max_iter=2).fit(X, Y)
    assert evaluate_arrays(unicon, X, Y)["retrieval"]["instance"]["UniCon r=3"]["x2y_R@1"] > 0
    with pytest.raises(RuntimeError, match="not fitted"):
        evaluate_arrays(ud.UniCon(), X, Y)
    with pytest.raises(TypeError, match="encode_x and encode_y"):
        evaluate_arrays(object(), X, Y)


# ======================================================================================
# device: the same numbers on a GPU
# ======================================================================================
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    X, Y = two_view(500, seed=19)
    opts = dict(rank=3, lr=1e-2, batch_size=100, max_epochs=3, patience=None, validation=0.2, dtype="float64")
    cpu = SGDCLIP(**opts).fit(X, Y)
    gpu = SGDCLIP(device="cuda", **opts).fit(X, Y)
    np.testing.assert_allclose(gpu.Wx_, cpu.Wx_, atol=1e-8)
    np.testing.assert_allclose([e["train_loss"] for e in gpu.history_], [e["train_loss"] for e in cpu.history_],
                               rtol=1e-10)
    z = gpu.encode_x(torch.as_tensor(X, device="cuda"))
    assert z.device.type == "cuda"
    cca_cpu = RegularizedCCA(rank=3).fit(X, Y)
    cca_gpu = RegularizedCCA(rank=3).fit(torch.as_tensor(X, device="cuda"), torch.as_tensor(Y, device="cuda"))
    np.testing.assert_allclose(cca_gpu.correlations_, cca_cpu.correlations_, atol=1e-10)
    bav_cpu = BatchAveragedUniCon(rank=3, batch_size=200, **UNICON).fit(X, Y)
    bav_gpu = BatchAveragedUniCon(rank=3, batch_size=200, device="cuda", **UNICON).fit(X, Y)
    np.testing.assert_allclose(np.abs(bav_gpu.W_mean_ - bav_cpu.W_mean_).max(), 0, atol=1e-8)
