"""Whitening folded into the encoders in streamed fits (unicon_dist.solver.folded, issue 19).

A streamed fit (a pair store, or arrays under a ``memory_budget``) with ``whiten=λ`` loads
only centred features Φ_c, embeds them with F' = F·A and multiplies the passes' C_c by the
whitening matrices once per iteration: C = A_x C_c A_y.  In exact arithmetic that is the
unfolded fit (panels whitened on every load); these tests compare the two code paths
(``folded.ENABLED``) and check that the folding is really taken.

Tolerance of the float32 fits (the derivation)
----------------------------------------------
Both paths round in float32 (unit round-off u = 2⁻²⁴ ≈ 6e-8; eps₃₂ = 2u = 1.19e-7); they
differ where the rounding enters.  Unfolded, every whitened feature φ̃_j = Σ_k φ_c,k A_kj
(of order 1: the whitened coordinates have unit variance) is rounded by up to
eps₃₂·Σ_k |φ_c,k||A_kj| ≤ eps₃₂·‖φ_c‖·‖A‖₂ ≈ eps₃₂·(m·λ̄)^{1/2}·(λ_min + s)^{−1/2}
≤ eps₃₂·√m·cond(A), with λ the eigenvalues of Σ, s the ridge shift and
cond(A) = ((λ_max + s)/(λ_min + s))^{1/2} (``FeatureWhitening.spectrum``'s
condition_regularised, square-rooted).  Folded, the embeddings are rounded alike (F' = F·A is
formed in float64) and C_c's tiles round relative to the centred features' scale before A
multiplies them in float64 -- an error of the same order.  W = [C]_r/ρ and the iterations
after it carry that relative perturbation, amplified by the step's sensitivity (the
spectral gap of the rank-r truncation, the damping), so the bound is a scale,
``scale = eps₃₂·√m·cond(A)`` (m = max(m_x, m_y), cond(A) the larger of the two views'),
and the factors on it are measured.  Over the 16 configurations below (n = 1,600,
m = 40/36 or 40 landmarks, cond(A) ≈ 94 (linear) and 26 (RBF), three iterations), in units
of ``scale``: W differs between the paths by 0.10 to 6.2, the folded W from a float64 fit by
0.04 to 2.2 (the unfolded one by 0.09 to 6.2: for the linear kernel folding is the more
accurate path, its features are not rounded after whitening), the per-iteration losses by
0.001 to 0.15, the exact path's C by 0.30 to 5.9.  The tolerances are 15, 5, 0.5 and 15
times ``scale``: 2.3 to 3.4 times the worst measured case.
"""

import numpy as np
import pytest
import torch

import unicon_dist as ud
from unicon_dist.data.rows import StoreRows
from unicon_dist.math.whitening import FeatureWhitening
from unicon_dist.solver import fit_paths, fixed_point, folded
from unicon_dist.solver.executor import LocalExecutor
from unicon_dist.solver.options import PassOptions
from unicon_dist.solver.planning import plan_panels

from _budgets import panel_budget

EPS32 = float(torch.finfo(torch.float32).eps)
W_FACTOR, TRUTH_FACTOR, LOSS_FACTOR, C_FACTOR = 15.0, 5.0, 0.5, 15.0


def _data(n=1600, dx=40, dy=36, k=6, seed=0):
    """Shared latent factors plus noise on scales 10^0 .. 10^-1.5, rotated so that the
    covariances are not diagonal (A then mixes coordinates) and offset (centring matters)."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, k))
    X = Z @ rng.standard_normal((k, dx)) + rng.standard_normal((n, dx)) * np.logspace(0, -1.5, dx)
    Y = Z @ rng.standard_normal((k, dy)) + rng.standard_normal((n, dy)) * np.logspace(-1.5, 0, dy)
    X = X @ np.linalg.qr(rng.standard_normal((dx, dx)))[0]
    Y = Y @ np.linalg.qr(rng.standard_normal((dy, dy)))[0]
    return (X + 1.0).astype(np.float32), (Y - 1.0).astype(np.float32)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    X, Y = _data()
    store = ud.PairStore.create(tmp_path_factory.mktemp("fold") / "pairs.zarr", X.shape[1], Y.shape[1],
                                chunk_rows=256)
    store.append(X, Y)
    return store, X, Y


KERNELS = {"linear": {}, "rbf": dict(kernel="rbf", n_landmarks=40)}
# svd_power_iter=0, oversampling 6: the sketch costs 2(r + r + 6) = 28 < r + min(m) widths,
# so svd="randomized" runs matrix-free on the operator's products (asserted below)
SVDS = {"exact": dict(svd="exact"), "randomized": dict(svd="randomized", svd_oversampling=6, svd_power_iter=0)}


def _options(kernel, svd, similarity):
    return dict(rank=4, whiten=1e-3, max_iter=3, tol=0.0, similarity=similarity, negatives=400, temperature=0.5,
                **KERNELS[kernel], **SVDS[svd])


class LoaderSpy:
    """Records the loaders fit_paths builds (monkeypatched over its StoreRows)."""

    def __init__(self):
        self.loaders = []

    def __call__(self, *args, **kwargs):
        loader = StoreRows(*args, **kwargs)
        self.loaders.append(loader)
        return loader


def _fit(options, data, monkeypatch, enabled):
    spy = LoaderSpy()
    with monkeypatch.context() as m:
        m.setattr(folded, "ENABLED", enabled)
        m.setattr(fit_paths, "StoreRows", spy)
        model = ud.UniCon(**options).fit(*data)
    return model, spy.loaders


def _relative(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


_TRUTH = {}


def _truth(X, Y, options):
    """The float64 in-memory fit (features formed once, whitened in float64)."""
    key = tuple(sorted((k, str(v)) for k, v in options.items()))
    if key not in _TRUTH:
        _TRUTH[key] = ud.UniCon(**options, dtype="float64").fit(X, Y)
    return _TRUTH[key]


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("svd", list(SVDS))
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("source", ["store", "arrays"])
def test_folded_fit_equals_unfolded_fit(pairs, monkeypatch, source, kernel, svd, similarity):
    store, X, Y = pairs
    options = _options(kernel, svd, similarity)
    data = (store,) if source == "store" else (X, Y)
    options["memory_budget"] = panel_budget(data if source == "arrays" else store, 300, **options)
    on, loaders_on = _fit(options, data, monkeypatch, True)
    off, loaders_off = _fit(options, data, monkeypatch, False)
    assert on.plan_.panel_rows < len(store)  # several panels: rows are streamed
    assert on._matrix_free == (svd == "randomized")
    assert on.n_iter_ == off.n_iter_ == 3

    # the folding is taken: the loaders only centre, with encoders F·A; switched off, they whiten
    for maps in ((on.map_x_, on.map_y_), (off.map_x_, off.map_y_)):
        assert all(isinstance(m, FeatureWhitening) and m.matrix is not None for m in maps)
    assert loaders_on and loaders_off
    for loader in loaders_on:
        for stage in (loader.map_x, loader.map_y):
            assert getattr(stage, "matrix", None) is None
            assert isinstance(stage, FeatureWhitening) and bool(stage.mean.any())  # centring kept
            assert (stage.base is None) == (kernel == "linear")
    for loader in loaders_off:
        assert loader.map_x is off.map_x_ and loader.map_y is off.map_y_
    assert not np.array_equal(on.W_, off.W_)  # two code paths, rounded differently

    cond = max(m.spectrum["condition_regularised"] ** 0.5 for m in (on.map_x_, on.map_y_))
    scale = EPS32 * max(on.n_features_x_, on.n_features_y_) ** 0.5 * cond
    assert _relative(on.W_, off.W_) <= W_FACTOR * scale
    np.testing.assert_allclose([h["loss"] for h in on.history_], [h["loss"] for h in off.history_],
                               rtol=LOSS_FACTOR * scale, atol=0)
    truth = _truth(X, Y, {k: v for k, v in options.items() if k != "memory_budget"})
    assert on.best_iteration_ == truth.best_iteration_
    assert _relative(on.W_, truth.W_) <= TRUTH_FACTOR * scale
    if svd == "exact":  # C of the kept iterate, A_x C_c A_y
        assert on.C_ is not None and _relative(on.C_, off.C_) <= C_FACTOR * scale


def test_folded_operator_is_exact_in_float64(pairs):
    """At the same encoders, the folded operator equals the unfolded one to float64 round-off:
    loss, statistics, C, C·Ω, Cᵀ·Ω, the general product and single tiles (the verifier's)."""
    store, X, Y = pairs
    # Nyström features of X's linear kernel and of Y's RBF kernel (m = 30 each)
    model = ud.UniCon(rank=4, whiten=1e-2, kernel_y="rbf", n_landmarks=30, max_iter=1, dtype="float64",
                      negatives=400, temperature=0.5).fit(X, Y)
    maps = (model.map_x_, model.map_y_)
    mx, my = model.n_features_x_, model.n_features_y_
    gen = torch.Generator().manual_seed(0)
    F1, F2 = (torch.randn((4, m), generator=gen, dtype=torch.float64) for m in (mx, my))
    plan = plan_panels(len(store), memory_budget=2 << 20, dim_x=40, dim_y=36, features_x=mx, features_y=my, rank=4,
                       itemsize=8, store_itemsize=4)
    assert plan.panel_rows < len(store)
    options = PassOptions(loss=model.loss_fn_, negatives=400, seed=0, dtype=torch.float64)

    def operator(stages, E1, E2):
        loader = StoreRows(str(store.path), *stages, E1, E2, "cosine", torch.float64, _store=store)
        return LocalExecutor().cross_product_operator(loader, len(store), (mx, my), 4, plan=plan, options=options)

    plain = operator(maps, F1, F2)
    stages, (E1, E2) = folded.folded_loader_parts(maps, (F1, F2))
    assert stages[0].matrix is None and stages[1].matrix is None and stages[1].base is maps[1].base
    assert torch.equal(stages[0].mean, maps[0].mean)
    torch.testing.assert_close(E1, F1 @ maps[0].matrix, rtol=0, atol=0)
    fold = folded.FoldedOperator(operator(stages, E1, E2), maps[0].matrix, maps[1].matrix)
    assert fold.shape == plain.shape == (mx, my)
    assert fold.loss == pytest.approx(plain.loss, rel=1e-12)
    assert fold.statistics["lse_max"] == pytest.approx(plain.statistics["lse_max"], rel=1e-12)
    C = plain.materialize()
    tol = dict(rtol=0, atol=1e-11 * float(C.abs().max()))
    torch.testing.assert_close(fold.materialize(), C, **tol)
    omega_y = torch.randn((my, 5), generator=gen, dtype=torch.float64)
    omega_x = torch.randn((mx, 5), generator=gen, dtype=torch.float64)
    scale = dict(rtol=0, atol=1e-11 * float(C.abs().max()) * 30)
    torch.testing.assert_close(fold.matmul(omega_y), C @ omega_y, **scale)
    torch.testing.assert_close(fold.rmatmul(omega_x), C.T @ omega_x, **scale)
    torch.testing.assert_close(fold.product(omega_x, None), omega_x.T @ C, **scale)
    keys = fold.tile_keys()
    assert keys == plain.tile_keys()
    torch.testing.assert_close(fold.tile_product(keys[1]), plain.tile_product(keys[1]), **tol)
    seconds = fold.phase_seconds()
    assert {"read", "features", "product", "statistics", "fold"} <= set(seconds)
    fold.release()


def test_folding_only_where_it_pays(pairs, monkeypatch):
    """Centring without whitening, and the in-memory array path, build no folded operator."""
    store, X, Y = pairs
    built = []
    real = folded.FoldedOperator

    def spy(*args):
        built.append(args)
        return real(*args)

    monkeypatch.setattr(folded, "FoldedOperator", spy)
    ud.UniCon(rank=3, whiten=None, max_iter=1).fit(store)
    ud.UniCon(rank=3, whiten=1e-3, max_iter=1).fit(X, Y)
    assert built == []
    ud.UniCon(rank=3, whiten=1e-3, max_iter=1).fit(store)
    assert built
    # whitening without centring: the loader's stage is the bare base map (nothing to subtract)
    stage = ud.UniCon(rank=3, center=False, max_iter=1).fit(store).map_x_
    assert stage.matrix is not None and folded.centring_stage(stage) is None


class Interrupt(Exception):
    """Stands in for the driver dying."""


def test_resumed_folded_fit_is_bitwise_equal(pairs, tmp_path, monkeypatch):
    """A streamed, whitened fit resumed from its checkpoint repeats the folded operations exactly."""
    store, X, Y = pairs
    options = dict(rank=4, whiten=1e-3, max_iter=4, tol=0.0, negatives=400, temperature=0.5, kernel="rbf",
                   n_landmarks=40)
    options["memory_budget"] = panel_budget(store, 300, **options)
    full = ud.UniCon(**options).fit(store)
    path = tmp_path / "ck.npz"
    step, calls = fixed_point.closed_form_step, []

    def dying_step(*args, **kwargs):  # the s = 0 step, then one per iteration: dies in iteration 3
        calls.append(1)
        if len(calls) > 3:
            raise Interrupt
        return step(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(fixed_point, "closed_form_step", dying_step)
        with pytest.raises(Interrupt):
            ud.UniCon(**options).fit(store, checkpoint=path)
    resumed = ud.UniCon(**options).fit(store, checkpoint=path, resume=True)
    for attr in ("F1_", "F2_", "W_"):
        np.testing.assert_array_equal(getattr(resumed, attr), getattr(full, attr))
    assert [h["loss"] for h in resumed.history_] == [h["loss"] for h in full.history_]
