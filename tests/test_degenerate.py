"""Degenerate settings: refused with a clear error before the math, never a ZeroDivisionError.

Issue 16, point 5: every row in one group, ``negatives=1`` and a zero RBF bandwidth used to
crash inside the scale update or a kernel tile (ZeroDivisionError); a negative Laplacian
bandwidth was accepted.  Kernel parameters are now checked at construction, the model's
contrast before the first pass, and a step whose matrix is exactly 0 stops with an error.
"""

import math

import numpy as np
import pytest
import torch

import unicon_dist as ud
import unicon_dist.solver.fit_paths as fit_paths
import unicon_dist.solver.fixed_point as fixed_point
from unicon_dist.math.kernels import RBF, ArcCosine, Laplacian, Polynomial, get_kernel, kernel_from_params
from unicon_dist.data.store import PairStore
from unicon_dist.solver.layout import make_batches

N, DX, DY = 48, 5, 4
NO_CONTRAST = "every pair is a positive of every other"


def _pairs(n=N, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, DX)), rng.standard_normal((n, DY))


def _model(**options):
    return ud.UniCon(**{"rank": 2, "max_iter": 4, **options})


@pytest.fixture
def no_pass(monkeypatch):
    """Fail the test if the fixed-point iteration (every pass over the rows) starts."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the iteration started; the setting should have been refused before it")

    monkeypatch.setattr(fixed_point, "solve", forbidden)


# ------------------------------------------------------------------ groups and negatives
def test_one_group_is_refused_before_the_first_pass(no_pass):
    X, Y = _pairs()
    with pytest.raises(ValueError, match=NO_CONTRAST) as info:
        _model().fit(X, Y, groups=np.zeros(N))
    assert f"all {N} pairs in one group" in str(info.value)


def test_one_group_of_a_store_is_refused_before_the_first_pass(tmp_path, no_pass):
    X, Y = _pairs()
    store = PairStore.create(tmp_path / "one-group.zarr", DX, DY, groups=True, chunk_rows=16)
    store.append(X, Y, groups=np.zeros(N, dtype=np.int64))
    with pytest.raises(ValueError, match=NO_CONTRAST):
        _model().fit(store)
    with pytest.raises(ValueError, match=NO_CONTRAST):
        _model().fit(str(store.path))


def test_a_store_fit_without_its_one_group_runs(tmp_path):
    # the refusal is about the groups, not the store: without them every other row is a negative
    X, Y = _pairs()
    store = PairStore.create(tmp_path / "one-group.zarr", DX, DY, groups=True, chunk_rows=16)
    store.append(X, Y, groups=np.zeros(N, dtype=np.int64))
    m = _model().fit(store, groups=False)
    assert m.n_iter_ >= 1 and np.all(np.isfinite(m.W_))


def test_negatives_of_one_row_are_refused(no_pass):
    X, Y = _pairs()
    with pytest.raises(ValueError, match="negatives batch size must be at least 2, got 1"):
        _model(negatives=1).fit(X, Y)
    with pytest.raises(ValueError, match="no negative to contrast"):
        make_batches(10, 1)
    with pytest.raises(ValueError, match="at least 2"):
        ud.CrossProductOperator(X, Y, X[:, :2], Y[:, :2], negatives=1)


def test_negatives_of_two_rows_and_a_last_batch_of_one_are_legal():
    # B = 2 is the smallest batch with a negative; n = 49 leaves one row alone in the last
    # batch, which contributes no negatives but is no error
    X, Y = _pairs(n=N + 1)
    assert [len(b) for b in make_batches(N + 1, 2, seed=0)][-1] == 1
    m = _model(negatives=2).fit(X, Y)
    assert np.all(np.isfinite(m.W_)) and math.isfinite(m.loss_)


def test_batches_that_each_hold_one_group_are_refused(no_pass):
    X, Y = _pairs()
    groups = np.arange(N) // 2  # contiguous batches of 2 rows: each batch is one group
    with pytest.raises(ValueError, match="every batch holds a single group") as info:
        _model(negatives=2, batch_split="contiguous").fit(X, Y, groups=groups)
    assert NO_CONTRAST in str(info.value)


def test_batches_with_two_groups_somewhere_are_legal():
    X, Y = _pairs()
    groups = np.arange(N) // 2
    groups[1] = groups[2]  # the first batch (rows 0, 1) now holds two groups
    m = _model(negatives=2, batch_split="contiguous").fit(X, Y, groups=groups)
    assert np.all(np.isfinite(m.W_))


# ------------------------------------------------------------------ the scale update
def test_a_zero_matrix_at_the_scale_update_is_a_clear_error():
    # the damped cosine step with C = 0 and W_prev ≠ 0: where the ZeroDivisionError arose
    X, Y = _pairs()
    m = _model(max_iter=2).fit(X, Y)
    F1, F2 = torch.as_tensor(m.F1_), torch.as_tensor(m.F2_)
    W_prev = (F1.T @ F2).to(torch.float64)
    C = torch.zeros_like(W_prev)
    with pytest.raises(ValueError, match="nothing to learn: the matrix this step factors .* is exactly 0"):
        fixed_point.step(C, W_prev, True, 1.0, fixed_point.FixedPointOptions.from_estimator(m), factors=(F1, F2))


def test_the_scale_update_stops_cleanly_when_the_contrast_check_is_bypassed(monkeypatch):
    # the iteration itself must not divide by zero, whatever the checks before it let through
    monkeypatch.setattr(fit_paths, "check_negative_pairs", lambda *args: None)
    X, Y = _pairs()
    with pytest.raises(ValueError, match="nothing to learn"):
        _model().fit(X, Y, groups=np.zeros(N))


def test_a_constant_view_has_nothing_to_learn():
    # legal options, but centring leaves the X features all 0: C = 0 at the first step, which
    # used to end as a "converged" fit with W = 0
    X, Y = _pairs()
    X[:] = 1.0
    with pytest.raises(ValueError, match="exactly 0"):
        _model(whiten=None).fit(X, Y)


# ------------------------------------------------------------------ kernels at construction
BAD_KERNELS = [
    (RBF, {"bandwidth": 0}, "rbf kernel bandwidth must be a finite number > 0"),
    (RBF, {"bandwidth": 0.0}, "rbf kernel bandwidth"),
    (RBF, {"bandwidth": -1.0}, "rbf kernel bandwidth"),
    (RBF, {"bandwidth": float("nan")}, "rbf kernel bandwidth"),
    (RBF, {"bandwidth": float("inf")}, "rbf kernel bandwidth"),
    (RBF, {"bandwidth": True}, "rbf kernel bandwidth"),
    (RBF, {"bandwidth": "1"}, "rbf kernel bandwidth"),
    (Laplacian, {"bandwidth": -1}, "laplacian kernel bandwidth must be a finite number > 0"),
    (Laplacian, {"bandwidth": 0}, "laplacian kernel bandwidth"),
    (Polynomial, {"degree": 0}, "polynomial kernel degree must be an integer >= 1"),
    (Polynomial, {"degree": -1}, "polynomial kernel degree"),
    (Polynomial, {"degree": 2.5}, "polynomial kernel degree"),
    (Polynomial, {"degree": 2.0}, "polynomial kernel degree"),
    (Polynomial, {"degree": True}, "polynomial kernel degree"),
    (Polynomial, {"gamma": 0}, "polynomial kernel gamma must be a finite number > 0"),
    (Polynomial, {"gamma": -0.5}, "polynomial kernel gamma"),
    (Polynomial, {"coef0": -1.0}, "polynomial kernel coef0 must be a finite number >= 0"),
    (Polynomial, {"coef0": float("nan")}, "polynomial kernel coef0"),
    (ArcCosine, {"order": 2}, "arc-cosine kernel order must be 0 or 1"),
    (ArcCosine, {"order": True}, "arc-cosine kernel order"),
    (ArcCosine, {"order": 1.0}, "arc-cosine kernel order"),
]


@pytest.mark.parametrize("cls, params, fragment", BAD_KERNELS,
                         ids=[f"{c.__name__}-{p}" for c, p, _ in BAD_KERNELS])
def test_bad_kernel_parameters_are_refused_at_construction(cls, params, fragment):
    with pytest.raises(ValueError, match=fragment):
        cls(**params)
    # by name too (job files and saved models construct kernels this way)
    with pytest.raises(ValueError, match=fragment):
        get_kernel(cls.name, **params)


@pytest.mark.parametrize("kernel", [
    RBF(), RBF(bandwidth=1e-3), RBF(bandwidth=np.float64(2.5)), Laplacian(bandwidth=3),
    Polynomial(degree=np.int64(2), gamma=0.5, coef0=0.0), Polynomial(degree=1), ArcCosine(order=0),
])
def test_good_kernel_parameters_are_kept_and_round_trip(kernel):
    assert kernel_from_params(kernel.params()) == kernel
    resolved = kernel.resolve(torch.as_tensor(_pairs()[0]))  # fills the None parameters, checked again
    assert all(v is not None for v in resolved.params().values())


def test_a_bad_kernel_cannot_reach_a_fit():
    # the crash: an RBF bandwidth of 0 divided by zero in the first kernel tile
    X, Y = _pairs()
    with pytest.raises(ValueError, match="rbf kernel bandwidth"):
        _model(kernel=get_kernel("rbf", bandwidth=0), n_landmarks=16).fit(X, Y)
