"""Nyström maps against K_XL K_LL⁺ K_LX computed with numpy; landmark selection; UniCon with kernels."""

import warnings

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist, pdist

import unicon_dist as ud
from unicon_dist import kernels as K
from unicon_dist.math.nystrom import LANDMARK_METHODS, select_landmarks

from _options import paper_unicon


def _data(n, d, seed):
    return np.random.default_rng(seed).standard_normal((n, d))


def _t(a):
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


# independent numpy kernels, with explicit parameters
def _angle(A, B):
    a = A / np.linalg.norm(A, axis=1, keepdims=True)
    b = B / np.linalg.norm(B, axis=1, keepdims=True)
    return 2.0 * np.arctan2(np.linalg.norm(a[:, None] - b[None], axis=2), np.linalg.norm(a[:, None] + b[None], axis=2))


REF = {
    "rbf": (K.RBF(bandwidth=1.8), lambda A, B: np.exp(-cdist(A, B, "sqeuclidean") / (2 * 1.8**2))),
    "laplacian": (K.Laplacian(bandwidth=3.0), lambda A, B: np.exp(-cdist(A, B, "cityblock") / 3.0)),
    "polynomial": (K.Polynomial(degree=3, gamma=0.3, coef0=1.0), lambda A, B: (0.3 * A @ B.T + 1.0) ** 3),
    "arccos1": (
        K.ArcCosine(order=1),
        lambda A, B: (np.linalg.norm(A, axis=1)[:, None] * np.linalg.norm(B, axis=1)[None, :]
                      * (np.sin(_angle(A, B)) + (np.pi - _angle(A, B)) * np.cos(_angle(A, B))) / np.pi),
    ),
}


def _gram(phi):
    phi = phi.numpy() if isinstance(phi, torch.Tensor) else phi
    return phi @ phi.T


# ------------------------------------------------------------ exact at m = n
@pytest.mark.parametrize("name", sorted(REF))
def test_all_points_as_landmarks_reproduce_K(name):
    kernel, ref = REF[name]
    X = _data(30, 5, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # K is well conditioned here: nothing may be dropped
        fmap = ud.NystroemMap.fit(X, kernel, n_landmarks=30, seed=0)
    assert fmap.n_features == 30
    phi = fmap.transform(X)
    assert phi.dtype == torch.float64 and phi.shape == (30, 30)
    Kx = ref(X, X)
    np.testing.assert_allclose(_gram(phi), Kx, rtol=0, atol=1e-8 * np.abs(Kx).max())
    # n_landmarks above n is capped at n
    assert ud.NystroemMap.fit(X, kernel, n_landmarks=500).n_features == 30


# --------------------------------------------------------- m < n: K_XL K_LL⁺ K_LX
@pytest.mark.parametrize("method", LANDMARK_METHODS)
@pytest.mark.parametrize("name", ["rbf", "laplacian", "arccos1"])
def test_low_rank_map_equals_pinv_formula(name, method):
    kernel, ref = REF[name]
    X = _data(80, 4, 1)
    Xnew = _data(11, 4, 2)
    fmap = ud.NystroemMap.fit(X, kernel, n_landmarks=15, method=method, seed=3)
    L = fmap.landmarks.numpy()
    assert L.shape == (15, 4)
    # the landmarks are 15 distinct rows of X
    hits = np.where(cdist(L, X) == 0.0)
    assert sorted(set(hits[0].tolist())) == list(range(15)) and len(set(hits[1].tolist())) == 15
    KLL = ref(L, L)
    pinv = np.linalg.pinv(KLL, rcond=1e-12, hermitian=True)
    for A, B in ((X, X), (Xnew, X), (Xnew, Xnew)):
        want = ref(A, L) @ pinv @ ref(L, B)
        got = fmap.transform(A).numpy() @ fmap.transform(B).numpy().T
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-8 * np.abs(ref(A, B)).max())
    # also against an eigh-based K_LL^{-1/2}
    w, V = np.linalg.eigh(KLL)
    phi_ref = ref(X, L) @ V / np.sqrt(w)
    np.testing.assert_allclose(_gram(fmap.transform(X)), _gram(phi_ref), rtol=0, atol=1e-8)
    # the low-rank map is genuinely an approximation here (the check above is not vacuous)
    assert np.abs(_gram(phi_ref) - ref(X, X)).max() > 1e-4


def test_error_decreases_with_more_landmarks():
    kernel, ref = REF["rbf"]
    X = _data(120, 3, 4)
    Kx = ref(X, X)
    ms = [3, 6, 12, 24, 48, 120]
    errs = []
    for m in ms:
        e = []
        for seed in range(3):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # large m may drop tiny eigenvalues
                phi = ud.NystroemMap.fit(X, kernel, n_landmarks=m, seed=seed).transform(X)
            e.append(np.linalg.norm(Kx - _gram(phi)))
        errs.append(np.mean(e))
    errs = np.array(errs)
    assert np.all(np.diff(errs) <= 1e-9 * errs[0]), errs
    assert errs[0] > 10 * errs[3] and errs[-1] < 1e-6 * errs[0]


# ------------------------------------------------------------ landmark selection
@pytest.mark.parametrize("method", LANDMARK_METHODS)
def test_select_landmarks_distinct_and_deterministic(method):
    X = _t(_data(90, 3, 5))
    kernel = K.RBF(bandwidth=1.5)
    for m in (1, 10, 45, 90):
        idx = select_landmarks(kernel, X, m, method, seed=7)
        assert len(idx) == m and len(np.unique(idx)) == m
        assert idx.min() >= 0 and idx.max() < 90
        np.testing.assert_array_equal(idx, select_landmarks(kernel, X, m, method, seed=7))
    picks = {tuple(select_landmarks(kernel, X, 10, method, seed=s)) for s in range(5)}
    assert len(picks) > 1  # the seed matters
    with pytest.raises(ValueError):
        select_landmarks(kernel, X, 0, method)
    with pytest.raises(ValueError):
        select_landmarks(kernel, X, 91, method)


def test_unknown_landmark_method():
    with pytest.raises(ValueError, match="landmark method"):
        select_landmarks(K.RBF(bandwidth=1.0), _t(_data(10, 2, 0)), 3, "random")


def _clusters(k, per, seed):
    rng = np.random.default_rng(seed)
    centres = 100.0 * np.eye(k, k + 1)  # pairwise 141 apart
    X = np.repeat(centres, per, axis=0) + 0.01 * rng.standard_normal((k * per, k + 1))
    return X, np.repeat(np.arange(k), per)


@pytest.mark.parametrize("kernel", [K.RBF(bandwidth=1.0), K.Linear()])
def test_kmeanspp_covers_every_cluster(kernel):
    X, labels = _clusters(4, 6, 0)
    for seed in range(10):
        for m in (4, 6):
            idx = select_landmarks(kernel, _t(X), m, "kmeans++", seed=seed)
            assert set(labels[idx]) == set(range(4)), (seed, m, idx)


def test_uniform_misses_clusters_sometimes():
    # the same data with uniform sampling usually does not cover every cluster with m = 4,
    # so the k-means++ test above is discriminating
    X, labels = _clusters(4, 6, 0)
    covered = [set(labels[select_landmarks(K.RBF(bandwidth=1.0), _t(X), 4, "uniform", seed=s)]) == set(range(4))
               for s in range(10)]
    assert not all(covered)


def test_leverage_runs_on_nonuniform_data():
    X, _ = _clusters(3, 20, 1)
    X = np.vstack([X, 50.0 * np.ones((1, 4))])  # one isolated point
    for seed in range(3):
        idx = select_landmarks(K.RBF(bandwidth=2.0), _t(X), 8, "leverage", seed=seed)
        assert len(np.unique(idx)) == 8 and idx.max() < X.shape[0]
    fmap = ud.NystroemMap.fit(X, K.RBF(bandwidth=2.0), 8, method="leverage", seed=0)
    assert np.isfinite(fmap.transform(X).numpy()).all()


# ------------------------------------------------------------ ill-conditioned K_LL
@pytest.mark.parametrize("name", ["rbf", "laplacian", "polynomial", "arccos1"])
def test_duplicated_landmarks_warn_and_stay_finite(name):
    kernel, ref = REF[name]
    base = _data(10, 5, 6)
    X = np.repeat(base, 4, axis=0)  # each row 4 times: K_LL has rank 10
    with pytest.warns(RuntimeWarning, match=r"effective rank 10\b"):
        fmap = ud.NystroemMap.fit(X, kernel, n_landmarks=40, seed=0)
    assert fmap.n_features == 10
    phi = fmap.transform(X).numpy()
    assert np.isfinite(phi).all()
    Kx = ref(X, X)
    np.testing.assert_allclose(phi @ phi.T, Kx, rtol=0, atol=1e-8 * np.abs(Kx).max())
    # duplicates map to identical features
    np.testing.assert_allclose(phi[0], phi[1], rtol=0, atol=1e-10 * np.abs(phi).max())


def test_eig_floor_validation():
    with pytest.raises(ValueError, match="eig_floor"):
        ud.NystroemMap.fit(_data(10, 2, 0), "rbf", 5, eig_floor=1.0)


def test_feature_basis_signs_do_not_depend_on_the_eigensolver():
    """Eigenvectors come back from LAPACK and cuSOLVER with different signs; the map fixes
    them (largest entry positive), so a basis computed with every sign flipped, or with
    the landmarks in another order, gives the same features."""
    rng = np.random.default_rng(8)
    X = torch.as_tensor(rng.standard_normal((200, 5)))
    L = X[:40]
    kernel = ud.get_kernel("rbf", bandwidth=2.0)
    base = ud.NystroemMap.from_landmarks(kernel, L)
    perm = torch.as_tensor(rng.permutation(40))
    permuted = ud.NystroemMap.from_landmarks(kernel, L[perm])
    np.testing.assert_allclose(permuted.transform(X).numpy(), base.transform(X).numpy(), atol=1e-9)
    eigh = torch.linalg.eigh
    try:  # an eigensolver that returns every vector negated
        torch.linalg.eigh = lambda A: (lambda w, v: (w, -v))(*eigh(A))
        flipped = ud.NystroemMap.from_landmarks(kernel, L)
    finally:
        torch.linalg.eigh = eigh
    np.testing.assert_array_equal(flipped.transform(X).numpy(), base.transform(X).numpy())


# ------------------------------------------------------------------ transform
@pytest.mark.parametrize("name", ["rbf", "polynomial"])
def test_transform_block_size_independent(name):
    kernel, _ = REF[name]
    X = _data(60, 4, 8)
    Xnew = _data(33, 4, 9)
    fmap = ud.NystroemMap.fit(X, kernel, n_landmarks=20, seed=1)
    a = fmap.transform(Xnew).numpy()
    for block in (7, 1, 33, 1000):
        np.testing.assert_allclose(fmap.transform(Xnew, block=block).numpy(), a, rtol=0,
                                   atol=1e-13 * np.abs(a).max())
    f32 = fmap.transform(Xnew, block=7, dtype=torch.float32)
    assert f32.dtype == torch.float32
    np.testing.assert_allclose(f32.numpy(), a, rtol=0, atol=1e-5 * np.abs(a).max())


def test_fit_resolves_median_bandwidth():
    X = _data(41, 3, 10)  # 820 pairs
    fmap = ud.NystroemMap.fit(X, "rbf", n_landmarks=10)
    d = np.sort(pdist(X))
    assert d[409] - 1e-12 <= fmap.kernel.bandwidth <= d[410] + 1e-12


# ------------------------------------------------------------------ the model
def _two_view(n, seed, d_x=7, d_y=6):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, 3))
    X = Z @ rng.standard_normal((3, d_x)) + 0.3 * rng.standard_normal((n, d_x))
    Y = Z @ rng.standard_normal((3, d_y)) + 0.3 * rng.standard_normal((n, d_y))
    return X, Y


def test_model_rbf_save_load_encode(tmp_path):
    X, Y = _two_view(120, 0)
    model = paper_unicon(rank=4, kernel="rbf", n_landmarks=60, max_iter=2).fit(X, Y)
    assert model.n_features_x_ == 60 and model.n_features_y_ == 60
    assert model.F1_.shape == (4, 60) and model.F2_.shape == (4, 60)
    # the bandwidth is the median heuristic on the training inputs (120·119/2 pairs: even)
    for A, fmap in ((X, model.map_x_), (Y, model.map_y_)):
        d = np.sort(pdist(A))
        assert d[len(d) // 2 - 1] - 1e-12 <= fmap.kernel.bandwidth <= d[len(d) // 2] + 1e-12
    Xn, Yn = _two_view(25, 1)
    zx, zy = model.encode_x(Xn), model.encode_y(Yn)
    assert zx.shape == (25, 4) and zy.shape == (25, 4)
    np.testing.assert_allclose(np.linalg.norm(zx, axis=1), 1.0, rtol=1e-5)
    # encoder = F1 Φ(x) with Φ the Nyström map, normalised (cosine similarity)
    ref = model.map_x_.transform(Xn).numpy() @ model.F1_.astype(np.float64).T
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(zx, ref, rtol=0, atol=1e-5)
    loaded = ud.UniCon.load(model.save(tmp_path / "rbf.npz"))
    np.testing.assert_array_equal(loaded.encode_x(Xn), zx)
    np.testing.assert_array_equal(loaded.encode_y(Yn), zy)
    np.testing.assert_array_equal(loaded.map_x_.landmarks.numpy(), model.map_x_.landmarks.numpy())
    assert loaded.map_x_.kernel == model.map_x_.kernel


def test_model_mixed_kernels():
    X, Y = _two_view(100, 2)
    with pytest.warns(RuntimeWarning, match="effective rank 6"):  # linear K_LL of 6-d inputs
        model = paper_unicon(rank=3, kernel_x="rbf", kernel_y="linear", n_landmarks=60, max_iter=2).fit(X, Y)
    assert model.map_x_.kernel.name == "rbf" and model.map_y_.kernel.name == "linear"
    assert model.n_features_x_ == 60 and model.n_features_y_ == 6
    # the linear Nyström map spans the row space: ΦΦᵀ = YYᵀ
    phi = model.map_y_.transform(Y).numpy()
    np.testing.assert_allclose(phi @ phi.T, Y @ Y.T, rtol=0, atol=1e-9 * np.abs(Y @ Y.T).max())
    assert model.encode_y(Y[:5]).shape == (5, 3)
    # without n_landmarks the linear side keeps the raw inputs and the rbf side takes min(n, 1000)
    plain = paper_unicon(rank=3, kernel_x="rbf", kernel_y="linear", max_iter=1).fit(X, Y)
    assert plain.map_y_ is None and plain.n_features_y_ == 6
    assert plain.map_x_ is not None and plain.n_features_x_ == 100


def test_model_randomized_svd_solver():
    X, Y = _two_view(150, 3)
    common = dict(rank=4, kernel="rbf", n_landmarks=120, max_iter=1, dtype="float64", factorization="sqrt",
                  similarity="dot")
    rnd = paper_unicon(svd="randomized", svd_oversampling=10, svd_power_iter=6, **common).fit(X, Y)
    assert rnd.svd_solver_ == "randomized"
    ex = paper_unicon(svd="exact", **common).fit(X, Y)
    assert ex.svd_solver_ == "exact"
    # same landmarks and features; the randomized step approximates the exact W
    W_r, W_e = rnd.W_, ex.W_
    assert np.linalg.norm(W_r - W_e) <= 1e-8 * np.linalg.norm(W_e)
    assert paper_unicon(svd="auto", **common).fit(X, Y).svd_solver_ == "exact"


def test_model_randomized_matrix_free():
    # r + m = 122 > 2(q + 1)(r + k) = 80: the model runs the sketch through the streamed C·Ω
    X, Y = _two_view(150, 3)
    common = dict(rank=2, kernel="rbf", n_landmarks=120, max_iter=2, dtype="float64", factorization="sqrt",
                  similarity="dot")
    rnd = paper_unicon(svd="randomized", svd_oversampling=4, svd_power_iter=4, **common)
    assert rnd._svd_plan(120, 120) == ("randomized", True)
    rnd.fit(X, Y)
    ex = paper_unicon(svd="exact", **common).fit(X, Y)
    assert rnd.svd_solver_ == "randomized"
    assert np.linalg.norm(rnd.W_ - ex.W_) <= 1e-7 * np.linalg.norm(ex.W_)


@pytest.mark.parametrize("kw", [dict(kernel="rbf", n_landmarks=5, rank=6),
                                dict(kernel="linear", n_landmarks=40, rank=8)])
def test_model_rank_above_feature_count(kw):
    X, Y = _two_view(60, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="rank"):
            paper_unicon(max_iter=1, **kw).fit(X, Y)


def test_model_too_many_landmarks():
    X, Y = _two_view(30, 5)
    with pytest.raises(ValueError, match="n_landmarks"):
        paper_unicon(rank=2, kernel="rbf", n_landmarks=31).fit(X, Y)
