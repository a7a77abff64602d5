"""Centring and ridge whitening of the features (unicon_dist.math.whitening) and the model options."""

import numpy as np
import pytest
import torch

import unicon_dist as ud
from unicon_dist.math.whitening import FeatureWhitening, Moments


def _views(n=400, dx=12, dy=9, seed=0):
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((n, 3))
    X = shared @ rng.standard_normal((3, dx)) + 0.5 * rng.standard_normal((n, dx)) * np.linspace(0.1, 3, dx) + 2.0
    Y = shared @ rng.standard_normal((3, dy)) + 0.5 * rng.standard_normal((n, dy)) - 1.0
    return X.astype(np.float64), Y.astype(np.float64)


def _inverse_sqrt(sigma, lam):
    shift = lam * np.trace(sigma) / sigma.shape[0]
    e, V = np.linalg.eigh(sigma + shift * np.eye(sigma.shape[0]))
    return (V / np.sqrt(e)) @ V.T


def test_moments_in_blocks_equal_numpy():
    X, _ = _views()
    mom = Moments(X.shape[1])
    for i in range(0, len(X), 37):
        mom.add(torch.as_tensor(X[i : i + 37]))
    np.testing.assert_allclose(mom.mean().numpy(), X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(mom.covariance().numpy(), np.cov(X.T, bias=True), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mom.covariance(center=False).numpy(), X.T @ X / len(X), rtol=1e-12)


@pytest.mark.parametrize("lam", [1e-3, 1e-1, 10.0])
def test_whitening_matches_a_dense_reference(lam):
    X, _ = _views()
    mom = Moments(X.shape[1])
    mom.add(torch.as_tensor(X))
    stage = FeatureWhitening.from_moments(None, mom, center=True, ridge=lam)
    A = _inverse_sqrt(np.cov(X.T, bias=True), lam)
    ref = (X - X.mean(0)) @ A
    np.testing.assert_allclose(stage.transform(torch.as_tensor(X)).numpy(), ref, rtol=1e-9, atol=1e-10)
    # the whitened features have covariance Σ (Σ + shift I)^{-1}: the identity as λ -> 0
    cov = np.cov(ref.T, bias=True)
    sigma = np.cov(X.T, bias=True)
    expected = sigma @ np.linalg.inv(sigma + lam * np.trace(sigma) / len(sigma) * np.eye(len(sigma)))
    np.testing.assert_allclose(cov, expected, atol=1e-9)
    e = np.linalg.eigvalsh(sigma)
    shift = lam * e.mean()
    assert stage.spectrum["condition_regularised"] == pytest.approx((e[-1] + shift) / (e[0] + shift), rel=1e-8)


def test_centring_only_and_uncentred_whitening():
    X, _ = _views()
    mom = Moments(X.shape[1])
    mom.add(torch.as_tensor(X))
    centred = FeatureWhitening.from_moments(None, mom, center=True, ridge=None)
    assert centred.matrix is None
    np.testing.assert_allclose(centred.transform(torch.as_tensor(X)).numpy(), X - X.mean(0), atol=1e-12)
    raw = FeatureWhitening.from_moments(None, mom, center=False, ridge=0.1)
    ref = X @ _inverse_sqrt(X.T @ X / len(X), 0.1)
    np.testing.assert_allclose(raw.transform(torch.as_tensor(X)).numpy(), ref, rtol=1e-9, atol=1e-10)


def test_constant_features_are_refused():
    mom = Moments(3)
    mom.add(torch.ones((10, 3), dtype=torch.float64))
    with pytest.raises(ValueError, match="whitening of Y: the features have zero variance"):
        FeatureWhitening.from_moments(None, mom, center=True, ridge=1e-3, name="Y")


def test_first_step_with_whitening_is_regularised_cca():
    """One step from s = 0 on whitened views is the SVD of Σ̃xx^{-1/2} Σxy Σ̃yy^{-1/2} (numpy)."""
    X, Y = _views()
    lam, r = 1e-2, 3
    model = ud.UniCon(rank=r, center=True, whiten=lam, max_iter=1, factorization="orthonormal", dtype="float64").fit(X, Y)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    Ax = _inverse_sqrt(np.cov(X.T, bias=True), lam)
    Ay = _inverse_sqrt(np.cov(Y.T, bias=True), lam)
    U, s, Vt = np.linalg.svd(Ax @ (Xc.T @ Yc / len(X)) @ Ay)
    # canonical directions in the input space, up to the sign of each pair
    ref_x, ref_y = Xc @ Ax @ U[:, :r], Yc @ Ay @ Vt[:r].T
    zx, zy = model.encode_x(X), model.encode_y(Y)
    ref_x /= np.linalg.norm(ref_x, axis=1, keepdims=True)
    ref_y /= np.linalg.norm(ref_y, axis=1, keepdims=True)
    signs = np.sign(np.sum(zx * ref_x, axis=0))
    np.testing.assert_allclose(zx * signs, ref_x, atol=1e-8)
    np.testing.assert_allclose(zy * signs, ref_y, atol=1e-8)


def test_whitened_model_round_trips(tmp_path):
    X, Y = _views()
    model = ud.UniCon(rank=3, kernel="rbf", n_landmarks=50, center=True, whiten=1e-2, temperature=0.3,
                      max_iter=2).fit(X, Y)
    assert isinstance(model.map_x_, FeatureWhitening) and model.map_x_.base is not None
    loaded = ud.UniCon.load(model.save(tmp_path / "m.npz"))
    assert isinstance(loaded.map_y_, FeatureWhitening)
    np.testing.assert_array_equal(loaded.encode_x(X[:20]), model.encode_x(X[:20]))
    np.testing.assert_array_equal(loaded.encode_y(Y[:20]), model.encode_y(Y[:20]))
    centred = ud.UniCon(rank=3, center=True, whiten=None, max_iter=1).fit(X, Y)
    again = ud.UniCon.load(centred.save(tmp_path / "c.npz"))
    assert again.map_x_.matrix is None and again.map_x_.base is None
    np.testing.assert_array_equal(again.encode_x(X[:20]), centred.encode_x(X[:20]))


@pytest.mark.parametrize("bad, match", [
    (dict(whiten=0.0), "whiten must be None or a ridge > 0"),
    (dict(whiten=-1e-3), "whiten must be None or a ridge > 0"),
    (dict(whiten=True), "whiten must be None or a ridge > 0"),
    (dict(whiten=float("nan")), "whiten must be None or a ridge > 0"),
    (dict(center="yes"), "center must be True or False"),
])
def test_options_are_validated(bad, match):
    X, Y = _views(n=20)
    with pytest.raises(ValueError, match=match):
        ud.UniCon(rank=2, **bad).fit(X, Y)


def test_every_constructor_option_is_a_parameter(tmp_path):
    """get_params (and so save/load, checkpoints and refit) carries every constructor option."""
    import inspect

    names = [p for p in inspect.signature(ud.UniCon.__init__).parameters if p != "self"]
    assert sorted(ud.UniCon().get_params()) == sorted(names)
    X, Y = _views()
    model = ud.UniCon(rank=2, center=False, whiten=0.5, loss_tol=1e-3, max_iter=2).fit(X, Y)
    loaded = ud.UniCon.load(model.save(tmp_path / "m.npz"))
    assert (loaded.center, loaded.whiten, loaded.loss_tol) == (False, 0.5, 1e-3)
