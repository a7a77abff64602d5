"""Fitting from a PairStore (rows streamed in panels) equals fitting the same rows in memory."""

import logging

import numpy as np
import pytest

import unicon_dist as ud
from unicon_dist.solver.planning import plan_panels
from unicon_dist.data.provenance import SAMPLE_ROWS

from _budgets import panel_budget


def _data(n=700, dx=12, dy=10, seed=0, n_groups=None):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, dx)).astype(np.float32)
    Y = (X[:, :dy] + 0.7 * rng.standard_normal((n, dy))).astype(np.float32)
    groups = None if n_groups is None else rng.integers(0, n_groups, n)
    return X, Y, groups


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("ooc")
    out = {}
    for name, n_groups in (("plain", None), ("groups", 300)):
        X, Y, g = _data(n_groups=n_groups)
        store = ud.PairStore.create(root / f"{name}.zarr", X.shape[1], Y.shape[1], groups=g is not None,
                                    chunk_rows=128)
        store.append(X[:500], Y[:500], None if g is None else g[:500])
        store.append(X[500:], Y[500:], None if g is None else g[500:])
        out[name] = (store, X, Y, g)
    return out


class SpyStore:
    """A PairStore that records how many rows each read asks for."""

    def __init__(self, store):
        self._store = store
        self.reads = []
        self.kinds = set()

    def __getattr__(self, name):
        return getattr(self._store, name)

    def __len__(self):
        return len(self._store)

    def read(self, rows):
        self.reads.append(np.arange(len(self))[rows].size)
        if not isinstance(rows, slice) and np.asarray(rows).size <= SAMPLE_ROWS:
            return self._store.read(rows)  # the fit's provenance digest of sampled rows
        self.kinds.add(type(rows).__name__)
        return self._store.read(rows)


CASES = [
    # (store, model options)
    ("plain", dict()),
    ("plain", dict(similarity="dot", temperature=2.0)),
    ("groups", dict()),
    ("plain", dict(negatives=256)),
    ("plain", dict(negatives=128, batch_split="contiguous")),
    ("groups", dict(negatives=200, loss="sigmoid")),
    ("plain", dict(kernel="rbf", n_landmarks=40)),
    # centring and ridge whitening: their moments come from one extra read of the store
    ("plain", dict(center=True, whiten=1e-2)),
    ("groups", dict(kernel="rbf", n_landmarks=40, center=True, whiten=1e-1, damping=0.5)),
    # matrix-free randomized SVD: C·Ω and Cᵀ·Ω stream the panels
    ("plain", dict(kernel_x="laplacian", kernel_y="angular", n_landmarks=30, svd="randomized",
                   svd_oversampling=2, svd_power_iter=0)),
]


@pytest.mark.parametrize("budget", [None, "small"], ids=["one-panel", "panels"])
@pytest.mark.parametrize("name, options", CASES)
def test_store_fit_equals_in_memory_fit(stores, name, options, budget):
    store, X, Y, g = stores[name]
    params = dict(rank=6, temperature=0.3, max_iter=2, tol=0.0)
    params.update(options)
    if budget is not None:
        budget = panel_budget(store, **params)
    params["memory_budget"] = budget
    ref = ud.UniCon(**params).fit(X, Y, groups=g)
    spy = SpyStore(store)
    model = ud.UniCon(**params).fit(spy, executor=ud.LocalExecutor())
    if budget is not None:
        assert model.plan_.panel_rows < len(store)
        # groups may stretch a panel to the end of a group (at most the largest group); the
        # median heuristic of a kernel reads a sample of at most 1000 rows
        limit = model.plan_.panel_rows + (0 if g is None else np.bincount(g).max())
        assert all(r <= limit or (r <= 1000 and "kernel" in str(options)) for r in spy.reads)
    assert model.n_iter_ == ref.n_iter_ == 2
    # a store fit folds whitening into the encoders (solver/folded.py): the two paths then
    # round differently, by as much as float32 rounds either against float64 (measured
    # 3.5e-5 folded, 2.6e-5 in memory, relative to max|W|); without whitening they repeat
    # the same operations and agree more tightly
    whitened = any(getattr(m, "matrix", None) is not None for m in (model.map_x_, model.map_y_))
    np.testing.assert_allclose(model.W_, ref.W_, rtol=0, atol=(1e-4 if whitened else 2e-5) * np.abs(ref.W_).max())
    np.testing.assert_allclose([h["loss"] for h in model.history_], [h["loss"] for h in ref.history_], rtol=2e-6)
    assert model.initial_loss_ == pytest.approx(ref.initial_loss_, rel=1e-6)
    # (the embeddings' last of r = 6 directions carries W's round-off amplified by its small
    # singular value: measured 3e-4 with the fold)
    np.testing.assert_allclose(model.encode_x(X[:50]), ref.encode_x(X[:50]), atol=1e-3 if whitened else 2e-4)
    if name == "plain" and (options.get("batch_split") == "contiguous" or options == {}):
        assert spy.kinds == {"slice"}  # panels of consecutive rows are read as ranges
    if "svd_power_iter" in options:
        assert model._matrix_free


def test_store_fit_by_path_and_groups_false(stores):
    store, X, Y, g = stores["groups"]
    params = dict(rank=5, temperature=0.3, max_iter=2, tol=0.0)
    by_path = ud.UniCon(**params).fit(str(store.path))
    np.testing.assert_allclose(by_path.W_, ud.UniCon(**params).fit(X, Y, groups=g).W_, atol=1e-5)
    no_groups = ud.UniCon(**params).fit(store.path, groups=False)
    np.testing.assert_allclose(no_groups.W_, ud.UniCon(**params).fit(X, Y).W_, atol=1e-5)


def test_saved_store_model_round_trips(stores, tmp_path):
    store, X, Y, _ = stores["plain"]
    model = ud.UniCon(rank=4, temperature=0.3, max_iter=2, kernel="rbf", n_landmarks=20).fit(store)
    loaded = ud.UniCon.load(model.save(tmp_path / "m.npz"))
    np.testing.assert_array_equal(loaded.encode_y(Y[:20]), model.encode_y(Y[:20]))


def test_store_fit_errors(stores, tmp_path):
    store, X, Y, g = stores["groups"]
    with pytest.raises(ValueError, match="do not pass Y"):
        ud.UniCon(rank=4).fit(store, Y)
    with pytest.raises(ValueError, match="store's own groups"):
        ud.UniCon(rank=4).fit(store, groups=g)
    with pytest.raises(ValueError, match="executor= runs passes over a PairStore"):
        ud.UniCon(rank=4).fit(X, Y, executor=ud.LocalExecutor())
    with pytest.raises(ValueError, match="landmarks='kmeans\\+\\+' needs every row in memory"):
        ud.UniCon(rank=4, kernel="rbf", landmarks="kmeans++").fit(store)
    with pytest.raises(ValueError, match=r"memory_budget=.* \(100000 bytes\) is too small for 700 pairs"):
        ud.UniCon(rank=4, memory_budget=100_000).fit(store)
    with pytest.raises(ValueError, match="rank=20 exceeds"):
        ud.UniCon(rank=20).fit(store)
    with pytest.raises(FileNotFoundError, match="no pair store"):
        ud.UniCon(rank=4).fit(tmp_path / "missing.zarr")
    empty = ud.PairStore.create(tmp_path / "empty.zarr", 3, 3)
    with pytest.raises(ValueError, match="holds 0 pairs"):
        ud.UniCon(rank=2).fit(empty)
    with pytest.raises(ValueError, match="temperature"):  # parameters are validated before any read
        ud.UniCon(rank=4, temperature=-1.0).fit(tmp_path / "missing.zarr")


def test_missing_chunk_during_fit_names_it(tmp_path):
    X, Y, _ = _data(n=600)
    store = ud.PairStore.create(tmp_path / "s.zarr", X.shape[1], Y.shape[1], chunk_rows=128)
    store.append(X, Y)
    (tmp_path / "s.zarr" / "y" / "c" / "3" / "0").unlink()
    with pytest.raises(ValueError, match=r"array 'y' chunk 3 .*rows 384.511"):
        ud.UniCon(rank=4, temperature=0.3, max_iter=2).fit(store)


def test_progress_is_logged_for_store_fits(stores, caplog):
    store = stores["plain"][0]
    with caplog.at_level(logging.INFO, logger="unicon_dist.solver.estimator"):
        budget = panel_budget(store, rank=4, temperature=0.3)
        ud.UniCon(rank=4, temperature=0.3, max_iter=1, verbose=True, memory_budget=budget).fit(store)
    text = caplog.text
    assert "panels of" in text and "statistics:" in text and "product:" in text and "iteration 1" in text


def test_panel_plan_scales_with_budget_not_n():
    sizes = dict(dim_x=512, dim_y=512, features_x=512, features_y=512, rank=128)
    small = plan_panels(100_000, memory_budget=1 << 30, **sizes)
    large = plan_panels(1_000_000, memory_budget=1 << 30, **sizes)
    assert 0 < large.panel_rows < small.panel_rows < 100_000
    for plan, n in ((small, 100_000), (large, 1_000_000)):
        used = plan.fixed_bytes + plan.panel_rows * (2 * plan.row_bytes + 8 * 512)
        assert used <= 1 << 30
    assert plan_panels(1000, memory_budget=1 << 30, **sizes).panel_rows == 1000


def test_an_object_that_is_not_an_executor_is_refused_by_name(tmp_path):
    rng = np.random.default_rng(0)
    store = ud.PairStore.create(tmp_path / "p.zarr", 4, 3)
    store.append(rng.standard_normal((20, 4)), rng.standard_normal((20, 3)))
    with pytest.raises(TypeError, match="Executor .*got object"):
        ud.UniCon(rank=2).fit(store, executor=object())
