"""Out-of-core fits on CUDA: tiles sized from the device, panels copied through pinned memory.

The budget arithmetic and the CPU paths run everywhere (the free-memory query is faked);
the tests that need a GPU are skipped without one.
"""

import numpy as np
import pytest
import torch

import unicon_dist as ud
from unicon_dist.data.rows import StoreRows, embed, features
from unicon_dist.solver import passes, planning
from unicon_dist.solver.options import PassOptions
from unicon_dist.solver.planning import device_tile_budget, plan_panels, plan_tiles

GiB, MiB = 1 << 30, 1 << 20
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _plan(budget=1 << 22):
    return plan_panels(1000, dim_x=8, dim_y=8, features_x=8, features_y=8, rank=4, memory_budget=budget)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((600, 12)).astype(np.float32)
    Y = (X[:, :10] + 0.7 * rng.standard_normal((600, 10))).astype(np.float32)
    s = ud.PairStore.create(tmp_path_factory.mktemp("tiles") / "s.zarr", 12, 10, chunk_rows=128)
    s.append(X, Y)
    return s


# ------------------------------------------------------------------ the device budget
def test_large_free_memory_gives_the_in_memory_default():
    free = lambda device: 64 * GiB  # noqa: E731
    assert device_tile_budget("cuda", 32 * MiB, free_bytes=free) == GiB
    # one element count in every precision: float64 tiles take twice the bytes
    assert device_tile_budget("cuda:0", 32 * MiB, itemsize=8, free_bytes=free) == 2 * GiB
    # not measurable in this process (a Ray driver without a GPU): the uncapped default
    assert device_tile_budget("cuda", 32 * MiB, free_bytes=lambda device: None) == GiB


def test_small_free_memory_caps_the_budget_and_the_plan_floors_it():
    # a quarter of 3 GiB for float64 tiles, to a power of two: 512 MiB, so 256 MiB of float32
    assert device_tile_budget("cuda", 32 * MiB, free_bytes=lambda device: 3 * GiB) == 256 * MiB
    # almost nothing free: the host plan's tiles, as before
    assert device_tile_budget("cuda", 32 * MiB, free_bytes=lambda device: 8 * MiB) == 32 * MiB
    assert device_tile_budget("cuda", 32 * MiB, free_bytes=lambda device: 0) == 32 * MiB


def test_cpu_budget_is_the_plan_and_never_asks_the_device():
    def refuse(device):
        raise AssertionError("the CPU path queried device memory")

    assert device_tile_budget("cpu", 12345, free_bytes=refuse) == 12345
    plan = _plan()
    for options in (PassOptions(), PassOptions(device="cpu", dtype=torch.float64)):
        cut = options.with_plan(plan)
        assert (cut.panel_rows, cut.memory_budget) == (plan.panel_rows, plan.tile_budget)


@pytest.mark.parametrize("sizes, expected", [
    (dict(n=1000, dim_x=8, dim_y=8, features_x=8, features_y=8, rank=4, memory_budget=1 << 22),
     (1000, 445644, 256, 541644, 4194304, 576)),
    (dict(n=200_000, dim_x=64, dim_y=64, features_x=512, features_y=512, rank=64, memory_budget=1 << 30,
          extra_bytes=5 << 20), (36289, 33554432, 9728, 57997312, 1073741824, 23552)),
    (dict(n=50_000, dim_x=32, dim_y=16, features_x=32, features_y=16, rank=8),
     (50000, 33554432, 704, 38354432, 2147483648, 1664)),
])
def test_host_panel_plans_are_unchanged(sizes, expected):
    # the numbers the host planner gave before tiles could come from the device
    plan = plan_panels(**sizes)
    assert (plan.panel_rows, plan.tile_budget, plan.row_bytes, plan.fixed_bytes, plan.budget,
            plan.bytes_per_panel_row) == expected


def test_cuda_options_take_the_device_budget(monkeypatch):
    monkeypatch.setattr(planning, "cuda_free_bytes", lambda device: 64 * GiB)
    plan = _plan()
    cut = PassOptions(device="cuda").with_plan(plan)
    assert cut.panel_rows == plan.panel_rows  # the host budget still sizes the panels
    assert cut.memory_budget == GiB
    # 16 MiB free: float64 tiles of 4 MiB, so 2 MiB of float32 ones (above the plan's)
    monkeypatch.setattr(planning, "cuda_free_bytes", lambda device: 16 * MiB)
    assert PassOptions(device=torch.device("cuda")).with_plan(plan).memory_budget == 2 * MiB
    monkeypatch.setattr(planning, "cuda_free_bytes", lambda device: MiB)
    assert PassOptions(device=torch.device("cuda")).with_plan(plan).memory_budget == plan.tile_budget


@pytest.mark.parametrize("free", [64 * GiB, 3 * GiB, 64 * MiB])
def test_float32_fit_and_float64_verifier_cut_tiles_alike(monkeypatch, free):
    """fit_paths gives the float32 fit half the float64 plan's tile budget; on CUDA both
    must still plan one tile shape, or the verifier refuses to compare them."""
    monkeypatch.setattr(planning, "cuda_free_bytes", lambda device: free)
    verify_plan = _plan(1 << 26)
    fit_plan = planning.PanelPlan(**{**verify_plan.__dict__, "tile_budget": verify_plan.tile_budget // 2})
    base = PassOptions(device="cuda")
    budgets = {dt: PassOptions.of(base, dtype=dt).with_plan(p).memory_budget
               for dt, p in ((torch.float32, fit_plan), (torch.float64, verify_plan))}
    for n in (4096, 20_000, 300_000):
        shapes = {(t.block_rows, t.block_cols) for t in (
            plan_tiles(n, 64, itemsize=4, memory_budget=budgets[torch.float32], device_type="cuda"),
            plan_tiles(n, 64, itemsize=8, memory_budget=budgets[torch.float64], device_type="cuda"))}
        assert len(shapes) == 1


# ------------------------------------------------------------------ StoreRows
def _plain_rows(rows, store, loader):
    """What StoreRows computed before pinned copies: ``torch.as_tensor`` on the device."""
    x, y, _ = store.read(rows)
    dev = torch.device(loader.device)
    X, Y = torch.as_tensor(x, device=dev), torch.as_tensor(y, device=dev)
    return embed(features(X, loader.map_x, loader.dtype), features(Y, loader.map_y, loader.dtype),
                 loader.F1, loader.F2, loader.similarity)


def _encoders(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 12, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("rows", [slice(0, 300), slice(250, 600), np.array([5, 3, 599, 100])])
def test_cpu_store_rows_are_bitwise_unchanged(store, rows):
    loader = StoreRows(str(store.path), None, None, *_encoders(), "cosine", torch.float32, "cpu")
    for got, want in zip(loader(rows), _plain_rows(rows, store, loader)):
        assert got.device.type == "cpu"
        assert torch.equal(got, want)
    assert loader._copies is None  # no CUDA machinery on the CPU


def test_store_rows_pickle_without_copy_machinery(store):
    import pickle

    loader = StoreRows(str(store.path), None, None, None, None, "cosine")
    loader._copies = object()  # stands for a stream and pinned buffers, which do not pickle
    again = pickle.loads(pickle.dumps(loader))
    assert again._copies is None and again._store is None
    assert torch.equal(again(slice(0, 50))[0], loader(slice(0, 50))[0])


# ------------------------------------------------------------------ on a GPU
@cuda
def test_cuda_store_rows_match_cpu(store):
    F1, F2 = _encoders()
    on_cpu = StoreRows(str(store.path), None, None, F1, F2, "cosine", torch.float64, "cpu")
    on_gpu = StoreRows(str(store.path), None, None, F1, F2, "cosine", torch.float64, "cuda")
    for rows in (slice(0, 300), slice(300, 600), np.array([7, 1, 598])):
        out = on_gpu(rows)
        # more work queued behind the copies on the current stream must see the copied rows
        total = sum(float(t.sum()) for t in out)
        assert total == pytest.approx(sum(float(t.sum()) for t in on_cpu(rows)), rel=1e-12)
        for got, want in zip(out, on_cpu(rows)):
            assert got.device.type == "cuda"
            torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)
    # the inputs themselves, before any arithmetic: copied exactly
    X, Y = on_gpu._copies(*store.read(slice(0, 600))[:2])
    x, y, _ = store.read(slice(0, 600))
    assert np.array_equal(X.cpu().numpy(), x) and np.array_equal(Y.cpu().numpy(), y)


@cuda
def test_cuda_store_fit_takes_tiles_from_the_device(store, monkeypatch):
    monkeypatch.setattr(planning, "cuda_free_bytes", lambda device: 16 * GiB)
    seen = []
    original = passes.plan_tiles

    def spy(*args, **keywords):
        seen.append((keywords["memory_budget"], keywords["device_type"]))
        return original(*args, **keywords)

    monkeypatch.setattr(passes, "plan_tiles", spy)
    # a general loss: CLIP's one-panel batches may take the fused kernels, which cut no tiles
    params = dict(rank=4, loss="sigmoid", temperature=0.3, max_iter=2, tol=0.0, memory_budget="64MiB")
    model = ud.UniCon(**params, device="cuda").fit(store, executor=ud.LocalExecutor())
    assert seen and set(seen) == {(GiB, "cuda")}
    assert model.plan_.tile_budget < GiB  # the host plan's tiles, which CUDA no longer uses
    seen.clear()
    ref = ud.UniCon(**params).fit(store, executor=ud.LocalExecutor())
    assert set(seen) == {(ref.plan_.tile_budget, "cpu")}
    np.testing.assert_allclose(model.W_, ref.W_, atol=1e-4 * np.abs(ref.W_).max())
