"""The passes as functions (unicon_dist.solver.passes): partial results merged over several
owners of panels equal one owner's result; merges are fixed-order; options and executors."""

import math

import numpy as np
import pytest
import torch

import unicon_dist as ud
from unicon_dist.math.losses import get_loss
from unicon_dist.solver import passes, products
from unicon_dist.solver.executor import Executor, LocalExecutor
from unicon_dist.solver.layout import Layout, assign_panels, shared_batches
from unicon_dist.solver.options import PassOptions
from unicon_dist.solver.panels import PanelSource, Scratch


def _tensors(n, dtype, seed=0, scale=1.0, zero=False):
    rng = np.random.default_rng(seed)
    zx = rng.standard_normal((n, 4))
    zx /= np.linalg.norm(zx, axis=1, keepdims=True)
    zy = zx + 0.7 * rng.standard_normal((n, 4))
    zy /= np.linalg.norm(zy, axis=1, keepdims=True)
    if zero:
        zx, zy = np.zeros((n, 1)), np.zeros((n, 1))
    arrays = (rng.standard_normal((n, 6)), rng.standard_normal((n, 5)), scale * zx, scale * zy)
    return [torch.as_tensor(a, dtype=dtype) for a in arrays]


def _context(tensors, options, groups=None):
    """A pass context over in-memory rows, built from the public pieces."""
    loss_fn = get_loss(options.loss, temperature=options.temperature, nu=options.nu)
    n = tensors[0].shape[0]
    layout = Layout.build(n, groups=groups, negatives=options.negatives, seed=options.seed,
                          batch_split=options.batch_split, panel_rows=options.panel_rows, device=options.device)
    loader = lambda rows: tuple(t[rows] if isinstance(rows, slice) else t[torch.as_tensor(rows)] for t in tensors)  # noqa: E731
    source = PanelSource(loader, layout, 1.0 / loss_fn.temperature if loss_fn.exponential else None)
    shape = (tensors[0].shape[1], tensors[1].shape[1])
    return passes.PassContext(layout, source, loss_fn, options, tensors[2].shape[1], shape, loss_fn.exponential,
                              Scratch(options.dtype, options.device))


def _tile(ctx, stats):
    fn = products.exp_weight_tile if ctx.exp else products.general_weight_tile
    return lambda b, *rest: fn(ctx, stats[b.key], b, *rest)


def _owners(ctx, n_owners):
    keys = ctx.layout.panel_keys
    shares = [[keys[k] for k in share] for share in assign_panels(ctx.layout.panel_sizes(), n_owners)]
    return [set(s) for s in shares], shared_batches(shares)


CASES = [
    # (loss, negatives, groups, scale, constant, owners)
    ("clip", "full", False, 1.0, False, 3),
    ("clip", "full", True, 9.0, False, 2),  # log-space statistics
    ("clip", 90, True, 1.0, False, 3),  # batches, some shared
    ("clip", "full", True, 1.0, True, 3),  # s = 0: closed-form product
    ("triplet", "full", True, 1.0, False, 2),
    ("sigmoid", 60, False, 1.0, True, 2),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss, negatives, grouped, scale, constant, n_owners", CASES)
def test_split_ownership_equals_one_owner(dtype, loss, negatives, grouped, scale, constant, n_owners):
    n = 150
    tensors = _tensors(n, dtype, seed=n_owners, scale=scale, zero=constant)
    groups = np.random.default_rng(2).integers(0, 50, n) if grouped else None
    options = PassOptions(loss=loss, temperature=0.2, negatives=negatives, panel_rows=40, block_rows=17,
                          block_cols=23, constant=constant, device=torch.device("cpu"), dtype=dtype)
    ctx = _context(tensors, options, groups)
    whole = passes.compute_statistics(ctx, lambda name, *a: [passes.run_round(ctx, None, name, *a)])
    owners, split = _owners(ctx, n_owners)
    assert split  # some batch really is shared, so the merge rounds run
    merged = passes.compute_statistics(ctx, lambda name, *a: [passes.run_round(ctx, o, name, *a) for o in owners],
                                       split)
    # the same tile sums, merged in another association (owner partials, then owner
    # order): a reordering error of a few units in the last place per merged panel of
    # the float64 accumulators, and of the statistics' dtype where they are stored in it
    k = max(len(b.panels) for b in ctx.layout.batches)
    eps = torch.finfo(dtype).eps
    for a, b in zip(whole, merged):
        assert a.keys() == b.keys()
        for key, v in a.items():
            if isinstance(v, torch.Tensor):
                finite = torch.isfinite(v)
                assert torch.equal(finite, torch.isfinite(b[key])), key
                if finite.any():
                    tol = 8 * k * eps * (1 + float(v[finite].abs().max()))
                    assert float((v[finite] - b[key][finite]).abs().max()) <= tol, key
    assert passes.loss_value(merged, n) == pytest.approx(passes.loss_value(whole, n), rel=8 * k * eps)

    C = products.product(ctx, whole, None, _tile(ctx, whole))
    parts = [products.product(ctx, merged, o, _tile(ctx, merged)) for o in owners]
    C_split = products.merge_products(parts)
    # the owners' parts are other groupings of the same float64 sum of tile products; the
    # tiles themselves can differ where a statistic stored in the tile dtype rounded the
    # other way above (one unit of that dtype), so the bound is in the tile dtype's units
    scale_C = float(torch.linalg.norm(C))
    assert float(torch.linalg.norm(C_split - C)) <= 64 * k * eps * max(scale_C, 1.0)


def test_merges_follow_owner_order_not_completion_order():
    """Owners answering in another order give the same bits: the merge is in owner order."""
    tensors = _tensors(120, torch.float32, seed=5)
    options = PassOptions(temperature=0.1, panel_rows=30, block_rows=16, block_cols=16,
                          device=torch.device("cpu"), dtype=torch.float32)
    ctx = _context(tensors, options)
    owners, split = _owners(ctx, 3)

    def run_reversed(name, *args):
        answers = {i: passes.run_round(ctx, owners[i], name, *args) for i in reversed(range(len(owners)))}
        return [answers[i] for i in range(len(owners))]

    a = passes.compute_statistics(ctx, lambda name, *x: [passes.run_round(ctx, o, name, *x) for o in owners], split)
    b = passes.compute_statistics(ctx, run_reversed, split)
    assert all(torch.equal(x[key], y[key]) if isinstance(x[key], torch.Tensor) else x[key] == y[key]
               for x, y in zip(a, b) for key in x)


def test_statistics_summary_of_no_batches():
    assert passes.statistics_summary([]) == {"lse_min": None, "lse_max": None, "log_space_batches": 0,
                                             "batches": 0}


def test_run_round_names_an_unknown_round():
    ctx = _context(_tensors(20, torch.float64), PassOptions(device=torch.device("cpu"), dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown pass-1 round 'sums'"):
        passes.run_round(ctx, None, "sums")


# ------------------------------------------------------------------ options and executors
def test_options_replace_keywords_and_refuse_unknown_ones():
    base = PassOptions(temperature=0.3, negatives=64)
    assert PassOptions.of(base, seed=4) == PassOptions(temperature=0.3, negatives=64, seed=4)
    assert PassOptions.of(None) == PassOptions()
    with pytest.raises(TypeError, match="unknown pass option.*'temprature'"):
        PassOptions.of(base, temprature=0.1)
    plan = ud.plan_panels(1000, dim_x=8, dim_y=8, features_x=8, features_y=8, rank=4, memory_budget=1 << 22)
    cut = base.with_plan(plan)
    assert (cut.panel_rows, cut.memory_budget) == (plan.panel_rows, plan.tile_budget)


def test_from_loader_takes_options_or_keywords_alike():
    tensors = _tensors(90, torch.float64, seed=3)
    loader = lambda rows: tuple(t[rows] if isinstance(rows, slice) else t[torch.as_tensor(rows)] for t in tensors)  # noqa: E731
    kw = dict(temperature=0.2, negatives=40, panel_rows=30, dtype=torch.float64)
    a = ud.CrossProductOperator.from_loader(loader, 90, (6, 5), 4, **kw)
    b = ud.CrossProductOperator.from_loader(loader, 90, (6, 5), 4, options=PassOptions(**kw))
    c = LocalExecutor().cross_product_operator(
        loader, 90, (6, 5), 4, plan=ud.plan_panels(90, dim_x=6, dim_y=5, features_x=6, features_y=5, rank=4),
        options=PassOptions(temperature=0.2, negatives=40, dtype=torch.float64))
    assert a.loss == b.loss and torch.equal(a.materialize(), b.materialize())  # the same operations
    assert c.loss == pytest.approx(a.loss, rel=1e-12)
    assert a.options == b.options and a.options.device == torch.device("cpu")


def test_executors_satisfy_the_protocol():
    assert isinstance(LocalExecutor(), Executor) and LocalExecutor.distributed is False
    assert isinstance(ud.RayExecutor(), Executor) and ud.RayExecutor.distributed is True  # not started
    assert not isinstance(object(), Executor)


def test_weights_guards():
    from unicon_dist.math import weights as W

    assert W.exp_floor(torch.float32) == pytest.approx(math.log(torch.finfo(torch.float32).tiny) + 1.0)
    assert W.fits_direct(40.0, torch.float32) and not W.fits_direct(41.0, torch.float32)
    assert W.fits_direct(300.0, torch.float64) and not W.fits_direct(301.0, torch.float64)
    parts = [torch.tensor([0.0, -math.inf]), torch.tensor([1.0, -math.inf])]
    np.testing.assert_allclose(W.logaddexp_all(parts).numpy(), [math.log(1 + math.e), -math.inf])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_scores_is_exp_of_the_scores(dtype):
    """2^{(log₂e·zx)zyᵀ} against e^{t} with t and the exp in float64, over the direct regime.

    Both the GEMM and the scaling round t by O(|t|·ε) (r = 16 terms here), so the relative error of
    e^{t} is bounded by c·(1 + |t|)·ε; the same bound is checked for torch.exp of the float32
    GEMM, so the new route is compared to the old one, not to an arbitrary tolerance.
    """
    from unicon_dist.math import weights as W

    g = torch.Generator().manual_seed(3)
    zx = torch.randn(200, 16, generator=g, dtype=torch.float64)
    zy = torch.randn(300, 16, generator=g, dtype=torch.float64)
    zx *= 40.0 / (zx.norm(dim=1).max() * zy.norm(dim=1).max())  # |t| ≤ 40: fits_direct's float32 bound
    t = zx @ zy.T
    ref = torch.exp(t)
    bound = 16 * (1 + t.abs()) * torch.finfo(dtype).eps
    new = W.exp_scores(zx.to(dtype), zy.to(dtype)).double()
    old = torch.exp((zx.to(dtype) @ zy.to(dtype).T)).double()
    assert ((old - ref).abs() / ref <= bound).all()
    assert ((new - ref).abs() / ref <= bound).all()
    out = torch.empty(200, 300, dtype=dtype)
    assert W.exp_scores(zx.to(dtype), zy.to(dtype), out=out).data_ptr() == out.data_ptr()
