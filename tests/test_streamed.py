"""Streamed C = Φ_Xᵀ S(z_x z_yᵀ) Φ_Y against the dense float64 reference (DESIGN §3)."""

import math

import numpy as np
import pytest
import torch

import unicon_dist as ud
from unicon_dist import losses as L

from _refs import batches, rel_err, uneven_groups

TEMPS = {"clip": 0.1, "triplet": 0.1, "sigmoid": 0.1}


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def make_problem(n, m_x=7, m_y=5, r=6, seed=0, dtype=np.float64, scale=1.0):
    rng = np.random.default_rng(seed)
    phi_x = rng.standard_normal((n, m_x))
    phi_y = rng.standard_normal((n, m_y))
    z_x = _unit(rng.standard_normal((n, r)))
    # y-embeddings correlated with their x partners so positives stand out
    z_y = _unit(z_x + 0.8 * rng.standard_normal((n, r)))
    z_x, z_y = scale * z_x, scale * z_y
    return tuple(a.astype(dtype) for a in (phi_x, phi_y, z_x, z_y))


def random_sizes(n, seed, max_size=5):
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(min(rng.integers(1, max_size + 1), n - sum(sizes))))
    return sizes


def make_groups(kind, n, seed=0):
    if kind == "none":
        return None
    sizes = random_sizes(n, seed)
    return uneven_groups(sizes, rng=np.random.default_rng(seed + 1), shuffle=(kind == "shuffled"))


def dense_reference(phi_x, phi_y, z_x, z_y, loss, tau, nu=1.0, groups=None, negatives="full", seed=0):
    """(C, loss) from the dense S of ``similarity_weights`` in float64."""
    px, py, zx, zy = (np.asarray(a, dtype=np.float64) for a in (phi_x, phi_y, z_x, z_y))
    n = px.shape[0]
    g = None if groups is None else np.asarray(groups)
    if negatives == "full":
        s = zx @ zy.T
        S = ud.similarity_weights(s, loss=loss, temperature=tau, nu=nu, groups=g)
        return px.T @ S @ py, ud.contrastive_loss(s, loss=loss, temperature=tau, nu=nu, groups=g)
    C = np.zeros((px.shape[1], py.shape[1]))
    total = 0.0
    for idx in batches(n, negatives, seed):
        s_b = zx[idx] @ zy[idx].T
        g_b = None if g is None else g[idx]
        w = len(idx) / n
        S_b = ud.similarity_weights(s_b, loss=loss, temperature=tau, nu=nu, groups=g_b) * w
        C += px[idx].T @ S_b @ py[idx]
        total += w * ud.contrastive_loss(s_b, loss=loss, temperature=tau, nu=nu, groups=g_b)
    return C, total


# --------------------------------------------------------------------------------------
# full negatives
# --------------------------------------------------------------------------------------
FULL_CASES = [
    # (loss, n, groups kind, nu, block_rows, block_cols)
    ("clip", 3000, "none", 1.0, 257, 1001),
    ("clip", 500, "none", 1.0, 37, 101),
    ("clip", 500, "sorted", 1.0, 37, 101),
    ("clip", 500, "shuffled", 1.0, 37, 101),
    ("clip", 401, "shuffled", 1.5, 64, 33),
    ("clip", 300, "shuffled", 1.0, None, None),
    ("triplet", 150, "none", 1.0, 37, 101),
    ("triplet", 150, "shuffled", 1.5, 37, 101),
    ("sigmoid", 150, "none", 1.5, 37, 101),
    ("sigmoid", 150, "shuffled", 1.0, 37, 101),
]


@pytest.mark.parametrize("loss, n, gkind, nu, br, bc", FULL_CASES)
def test_full_negatives_equal_dense(loss, n, gkind, nu, br, bc):
    phi_x, phi_y, z_x, z_y = make_problem(n, seed=n)
    groups = make_groups(gkind, n, seed=n)
    tau = TEMPS[loss]
    C, lval = ud.weighted_cross_product(
        phi_x, phi_y, z_x, z_y, loss=loss, temperature=tau, nu=nu, groups=groups,
        block_rows=br, block_cols=bc, return_loss=True,
    )
    C_ref, l_ref = dense_reference(phi_x, phi_y, z_x, z_y, loss, tau, nu, groups)
    assert isinstance(C, np.ndarray) and C.dtype == np.float64 and C.shape == (7, 5)
    assert rel_err(C, C_ref) < 1e-9
    assert lval == pytest.approx(l_ref, rel=1e-10)


# --------------------------------------------------------------------------------------
# negatives = B (block-diagonal S, seeded batches)
# --------------------------------------------------------------------------------------
NEG_CASES = [
    # (loss, n, groups kind, B, seed, block_rows, block_cols)
    ("clip", 500, "none", 64, 0, 37, 101),
    ("clip", 500, "shuffled", 64, 3, 37, 101),
    ("clip", 333, "sorted", 100, 1, 17, 29),
    ("triplet", 130, "shuffled", 40, 2, 37, 101),
    ("sigmoid", 130, "none", 40, 5, 11, 23),
]


@pytest.mark.parametrize("loss, n, gkind, B, seed, br, bc", NEG_CASES)
def test_batched_negatives_equal_dense(loss, n, gkind, B, seed, br, bc):
    assert n % B != 0
    phi_x, phi_y, z_x, z_y = make_problem(n, seed=7 + n)
    groups = make_groups(gkind, n, seed=n)
    tau = TEMPS[loss]
    C, lval = ud.weighted_cross_product(
        phi_x, phi_y, z_x, z_y, loss=loss, temperature=tau, negatives=B, groups=groups,
        seed=seed, block_rows=br, block_cols=bc, return_loss=True,
    )
    C_ref, l_ref = dense_reference(phi_x, phi_y, z_x, z_y, loss, tau, 1.0, groups, negatives=B, seed=seed)
    assert rel_err(C, C_ref) < 1e-9
    assert lval == pytest.approx(l_ref, rel=1e-10)
    # the batch split matters: another seed gives a different C, full negatives another again
    C_other = ud.weighted_cross_product(
        phi_x, phi_y, z_x, z_y, loss=loss, temperature=tau, negatives=B, groups=groups, seed=seed + 1
    )
    assert rel_err(C_other, C_ref) > 1e-6
    C_full = ud.weighted_cross_product(phi_x, phi_y, z_x, z_y, loss=loss, temperature=tau, groups=groups)
    assert rel_err(C_full, C_ref) > 1e-6


def test_batch_size_at_least_n_is_full():
    phi_x, phi_y, z_x, z_y = make_problem(90, seed=1)
    C_full = ud.weighted_cross_product(phi_x, phi_y, z_x, z_y, temperature=0.1)
    for B in (90, 1000):
        C_B = ud.weighted_cross_product(phi_x, phi_y, z_x, z_y, temperature=0.1, negatives=B)
        assert rel_err(C_B, C_full) < 1e-12


# --------------------------------------------------------------------------------------
# precision: |s/τ| ≈ 80 in float32
# --------------------------------------------------------------------------------------
def extreme_problem(n, seed=0):
    """float32 inputs with s = z_x z_yᵀ in [−0.8, 0.8] and many |s| close to 0.8."""
    rng = np.random.default_rng(seed)
    r = 8
    dirs = _unit(rng.standard_normal((6, r)))
    which = rng.integers(0, 6, n)
    sign = rng.choice([-1.0, 1.0], n)
    z_x = _unit(sign[:, None] * dirs[which] + 0.02 * rng.standard_normal((n, r)))
    z_y = _unit(z_x + 0.02 * rng.standard_normal((n, r)))
    z_x, z_y = np.sqrt(0.8) * z_x, np.sqrt(0.8) * z_y
    phi_x = rng.standard_normal((n, 6))
    phi_y = rng.standard_normal((n, 4))
    return tuple(a.astype(np.float32) for a in (phi_x, phi_y, z_x, z_y))


@pytest.mark.parametrize(
    "loss, n, gkind, negatives",
    [("clip", 600, "none", "full"), ("clip", 600, "shuffled", "full"), ("clip", 600, "shuffled", 97),
     ("sigmoid", 120, "shuffled", "full"), ("triplet", 120, "none", "full")],
)
def test_extreme_similarities_float32(loss, n, gkind, negatives):
    phi_x, phi_y, z_x, z_y = extreme_problem(n, seed=n)
    s64 = z_x.astype(np.float64) @ z_y.astype(np.float64).T
    assert np.abs(s64).max() > 0.79 and s64.min() < -0.79  # really |s/τ| ≈ 80
    groups = make_groups(gkind, n, seed=3)
    tau = 0.01
    C, lval = ud.weighted_cross_product(
        phi_x, phi_y, z_x, z_y, loss=loss, temperature=tau, groups=groups, negatives=negatives,
        block_rows=61, block_cols=143, return_loss=True,
    )
    assert C.dtype == np.float64
    assert np.all(np.isfinite(C)) and np.isfinite(lval)
    C_ref, l_ref = dense_reference(phi_x, phi_y, z_x, z_y, loss, tau, 1.0, groups, negatives=negatives)
    assert np.all(np.isfinite(C_ref))
    assert rel_err(C, C_ref) < 2e-5
    assert lval == pytest.approx(l_ref, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("dtype, scale", [(torch.float64, 100.0), (torch.float32, 9.0)])
def test_underflowing_exponentials_equal_dense(dtype, scale):
    """Log-space tiles whose e^{t − max} underflow (t − max down to −4000 in float64, −180 in
    float32): the exp arguments clamped at ``exp_floor`` change nothing measurable."""
    from unicon_dist.math.weights import exp_floor

    n, tau = 300, 0.1
    phi_x, phi_y, z_x, z_y = make_problem(n, seed=21, scale=scale)
    t = z_x @ z_y.T / tau
    assert (t - t.max(1, keepdims=True)).min() < exp_floor(dtype) - 10  # the clamp is exercised
    groups = make_groups("shuffled", n, seed=2)
    tensors = [torch.as_tensor(a, dtype=dtype) for a in (phi_x, phi_y, z_x, z_y)]
    op = ud.CrossProductOperator(*tensors, loss="clip", temperature=tau, groups=groups, block_rows=37,
                                 block_cols=50)
    C = op.materialize().numpy()
    assert op.statistics["log_space_batches"] == 1
    C_ref, l_ref = dense_reference(phi_x, phi_y, z_x, z_y, "clip", tau, 1.0, groups)
    assert rel_err(C, C_ref) < (1e-12 if dtype == torch.float64 else 2e-5)
    assert op.loss == pytest.approx(l_ref, rel=1e-12 if dtype == torch.float64 else 1e-5)


def test_logsumexp_of_extreme_and_empty_slices():
    from unicon_dist.math.weights import logsumexp

    inf = float("inf")
    t = torch.tensor([[0.0, -1000.0, -inf], [-inf, -inf, -inf], [5.0, 5.0, -3000.0]], dtype=torch.float64)
    np.testing.assert_array_equal(logsumexp(t, 1).numpy(), [0.0, -inf, 5.0 + math.log(2.0)])
    np.testing.assert_array_equal(logsumexp(t.T.contiguous(), 0).numpy(), [0.0, -inf, 5.0 + math.log(2.0)])


# --------------------------------------------------------------------------------------
# return_loss, torch in/out, operator, determinism
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["clip", "triplet", "sigmoid"])
def test_return_loss_equals_contrastive_loss(loss):
    n = 80
    phi_x, phi_y, z_x, z_y = make_problem(n, seed=2)
    groups = make_groups("shuffled", n, seed=4)
    C, lval = ud.weighted_cross_product(
        phi_x, phi_y, z_x, z_y, loss=loss, temperature=0.2, groups=groups, return_loss=True
    )
    C2 = ud.weighted_cross_product(phi_x, phi_y, z_x, z_y, loss=loss, temperature=0.2, groups=groups)
    np.testing.assert_array_equal(C, C2)
    want = ud.contrastive_loss(z_x @ z_y.T, loss=loss, temperature=0.2, groups=groups)
    assert isinstance(lval, float)
    assert lval == pytest.approx(want, rel=1e-10)


def test_torch_inputs_give_torch_output():
    phi_x, phi_y, z_x, z_y = make_problem(100, seed=5)
    C_np = ud.weighted_cross_product(phi_x, phi_y, z_x, z_y, temperature=0.1)
    C_t = ud.weighted_cross_product(*(torch.from_numpy(a) for a in (phi_x, phi_y, z_x, z_y)), temperature=0.1)
    assert isinstance(C_t, torch.Tensor) and C_t.dtype == torch.float64 and tuple(C_t.shape) == (7, 5)
    assert rel_err(C_t.numpy(), C_np) < 1e-12


def test_identity_features_give_dense_S():
    """With Φ_X = Φ_Y = I (m = n) the streamed C is S itself."""
    n = 40
    _, _, z_x, z_y = make_problem(n, seed=9)
    groups = make_groups("shuffled", n, seed=9)
    eye = np.eye(n)
    C = ud.weighted_cross_product(eye, eye, z_x, z_y, temperature=0.1, groups=groups, block_rows=7, block_cols=9)
    S = ud.similarity_weights(z_x @ z_y.T, temperature=0.1, groups=groups)
    np.testing.assert_allclose(C, S, rtol=0, atol=1e-14)


@pytest.mark.parametrize("negatives", ["full", 45])
@pytest.mark.parametrize("loss", ["clip", "sigmoid"])
def test_operator_products(loss, negatives):
    n = 160
    phi_x, phi_y, z_x, z_y = make_problem(n, m_x=9, m_y=6, seed=11)
    groups = make_groups("shuffled", n, seed=11)
    op = ud.CrossProductOperator(
        phi_x, phi_y, z_x, z_y, loss=loss, temperature=0.1, negatives=negatives, groups=groups,
        seed=4, block_rows=37, block_cols=50,
    )
    assert tuple(op.shape) == (9, 6)
    C = np.asarray(op.materialize(), dtype=np.float64)
    C_ref, l_ref = dense_reference(phi_x, phi_y, z_x, z_y, loss, 0.1, 1.0, groups, negatives=negatives, seed=4)
    assert rel_err(C, C_ref) < 1e-9
    assert float(op.loss) == pytest.approx(l_ref, rel=1e-10)
    rng = np.random.default_rng(0)
    om_y = rng.standard_normal((6, 3))
    om_x = rng.standard_normal((9, 4))
    got_m = np.asarray(op.matmul(om_y), dtype=np.float64)
    got_r = np.asarray(op.rmatmul(om_x), dtype=np.float64)
    assert got_m.shape == (9, 3) and got_r.shape == (6, 4)
    np.testing.assert_allclose(got_m, C @ om_y, rtol=0, atol=1e-11 * np.abs(C @ om_y).max())
    np.testing.assert_allclose(got_r, C.T @ om_x, rtol=0, atol=1e-11 * np.abs(C.T @ om_x).max())
    # torch omegas work as well
    got_t = op.matmul(torch.from_numpy(om_y))
    np.testing.assert_allclose(np.asarray(got_t, dtype=np.float64), C @ om_y, rtol=0,
                               atol=1e-11 * np.abs(C @ om_y).max())


@pytest.mark.parametrize("loss, gkind", [("clip", "none"), ("clip", "shuffled"), ("triplet", "shuffled")])
def test_deterministic_across_block_sizes(loss, gkind):
    n = 230
    phi_x, phi_y, z_x, z_y = make_problem(n, seed=13)
    groups = make_groups(gkind, n, seed=13)
    results = [
        ud.weighted_cross_product(phi_x, phi_y, z_x, z_y, loss=loss, temperature=0.1, groups=groups,
                                  block_rows=br, block_cols=bc)
        for br, bc in [(None, None), (37, 101), (n, n), (1, 230), (229, 3)]
    ]
    for C in results[1:]:
        assert rel_err(C, results[0]) < 1e-12
    # repeated calls are bit-identical
    again = ud.weighted_cross_product(phi_x, phi_y, z_x, z_y, loss=loss, temperature=0.1, groups=groups,
                                      block_rows=37, block_cols=101)
    np.testing.assert_array_equal(again, results[1])


def test_rows_permuted_together_leave_C_unchanged():
    n = 120
    phi_x, phi_y, z_x, z_y = make_problem(n, seed=17)
    groups = make_groups("shuffled", n, seed=17)
    C = ud.weighted_cross_product(phi_x, phi_y, z_x, z_y, temperature=0.1, groups=groups)
    p = np.random.default_rng(1).permutation(n)
    Cp = ud.weighted_cross_product(phi_x[p], phi_y[p], z_x[p], z_y[p], temperature=0.1, groups=groups[p])
    assert rel_err(Cp, C) < 1e-12


class _GeneralClip(L.ContrastiveLoss):
    """CLIP written as a generic family member (exponential=False): exercises the general-ψ path."""

    name = "general-clip"
    exponential = False

    def __init__(self, temperature, nu=1.0):
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "nu", nu)
        object.__setattr__(self, "epsilon", 1.0)

    def phi(self, a):
        return self.temperature * torch.log(a)

    def dphi(self, a):
        return self.temperature / a

    def psi(self, x):
        return torch.exp(x / self.temperature)

    def dpsi(self, x):
        return torch.exp(x / self.temperature) / self.temperature


@pytest.mark.parametrize("nu", [1.0, 1.5])
def test_general_path_agrees_with_exponential_path(nu):
    n = 140
    phi_x, phi_y, z_x, z_y = make_problem(n, seed=19)
    groups = make_groups("shuffled", n, seed=19)
    C_exp, l_exp = ud.weighted_cross_product(phi_x, phi_y, z_x, z_y, loss=L.InfoNCE(temperature=0.3, nu=nu),
                                             groups=groups, block_rows=37, block_cols=101, return_loss=True)
    C_gen, l_gen = ud.weighted_cross_product(phi_x, phi_y, z_x, z_y, loss=_GeneralClip(0.3, nu),
                                             groups=groups, block_rows=37, block_cols=101, return_loss=True)
    assert rel_err(C_gen, C_exp) < 1e-9
    assert l_gen == pytest.approx(l_exp, rel=1e-10)


def test_progress_reports_every_row_block():
    """The passes report (stage, done, total) once per block of rows, ending at total."""
    rng = np.random.default_rng(7)
    n = 230
    X, Y = rng.normal(size=(n, 6)), rng.normal(size=(n, 5))
    calls = []
    # the tiled passes (a batch this small would otherwise take both passes at once, one report each)
    ud.weighted_cross_product(X, Y, X[:, :3], Y[:, :3], block_rows=50, block_cols=64, fused="off",
                              progress=lambda stage, done, total: calls.append((stage, done, total)))
    stats = [c for c in calls if c[0] == "statistics"]
    prods = [c for c in calls if c[0] == "product"]
    assert [d for _, d, _ in stats] == [1, 2, 3, 4, 5] and {t for _, _, t in stats} == {5}
    assert prods[-1][1] == prods[-1][2] and len(prods) == prods[-1][2]


# --------------------------------------------------------------------------------------
# s ≡ 0 (the fixed point's first step) takes the rank-two shortcut
# --------------------------------------------------------------------------------------
ZERO_CASES = [
    # (loss, n, groups kind, nu, negatives, zero side)
    ("clip", 300, "none", 1.0, "full", "x"),
    ("clip", 300, "shuffled", 1.5, "full", "y"),
    ("clip", 257, "sorted", 1.0, 64, "both"),
    ("triplet", 120, "none", 1.5, "full", "x"),
    ("triplet", 120, "shuffled", 1.0, 50, "both"),
    ("sigmoid", 120, "shuffled", 1.5, "full", "y"),
    ("sigmoid", 120, "none", 1.0, 50, "x"),
]


@pytest.mark.parametrize("loss, n, gkind, nu, negatives, side", ZERO_CASES)
def test_zero_similarities_equal_dense(loss, n, gkind, nu, negatives, side):
    phi_x, phi_y, z_x, z_y = make_problem(n, seed=3 * n)
    if side in ("x", "both"):
        z_x = np.zeros_like(z_x)
    if side in ("y", "both"):
        z_y = np.zeros_like(z_y)
    groups = make_groups(gkind, n, seed=n)
    tau = TEMPS[loss]
    stages = []
    C, lval = ud.weighted_cross_product(
        phi_x, phi_y, z_x, z_y, loss=loss, temperature=tau, nu=nu, groups=groups, negatives=negatives,
        block_rows=37, block_cols=53, return_loss=True, progress=lambda stage, done, total: stages.append(stage),
    )
    C_ref, l_ref = dense_reference(phi_x, phi_y, z_x, z_y, loss, tau, nu, groups, negatives=negatives)
    assert rel_err(C, C_ref) < 1e-9
    assert lval == pytest.approx(l_ref, rel=1e-10)
    assert "statistics" not in stages  # no pass over the n² tiles was needed


# --------------------------------------------------------------------------------------
# panels: rows visited in panels (what out-of-core and distributed passes use)
# --------------------------------------------------------------------------------------
PANEL_CASES = [
    # (loss, n, groups kind, negatives, panel_rows, block_rows, block_cols, scale)
    ("clip", 500, "none", "full", 120, 37, 50, 1.0),
    ("clip", 500, "none", "full", 120, 37, 50, 9.0),  # |s/τ| up to 90: the log-space path
    ("clip", 500, "shuffled", "full", 97, 37, 50, 1.0),
    ("clip", 500, "shuffled", 64, 150, 17, 29, 1.0),  # several batches per load
    ("clip", 500, "none", 200, 70, 17, 29, 1.0),  # batches larger than a panel
    ("triplet", 160, "shuffled", "full", 45, 13, 21, 1.0),
    ("sigmoid", 160, "none", 70, 30, 13, 21, 1.0),
]


@pytest.mark.parametrize("loss, n, gkind, negatives, panel_rows, br, bc, scale", PANEL_CASES)
def test_panels_equal_dense(loss, n, gkind, negatives, panel_rows, br, bc, scale):
    phi_x, phi_y, z_x, z_y = make_problem(n, seed=n + 3, scale=scale)
    groups = make_groups(gkind, n, seed=n)
    tau = TEMPS[loss]
    op = ud.CrossProductOperator(
        phi_x, phi_y, z_x, z_y, loss=loss, temperature=tau, negatives=negatives, groups=groups,
        block_rows=br, block_cols=bc, panel_rows=panel_rows,
    )
    C_ref, l_ref = dense_reference(phi_x, phi_y, z_x, z_y, loss, tau, 1.0, groups, negatives=negatives)
    assert rel_err(op.materialize().numpy(), C_ref) < 1e-9
    assert op.loss == pytest.approx(l_ref, rel=1e-10)
    omega = np.random.default_rng(0).standard_normal((5, 3))
    assert rel_err(op.matmul(omega).numpy(), C_ref @ omega) < 1e-9
    omega = np.random.default_rng(1).standard_normal((7, 2))
    assert rel_err(op.rmatmul(omega).numpy(), C_ref.T @ omega) < 1e-9
    assert len({p for b in op.batches for p in b.panels}) > 1


def test_panels_never_split_a_group_and_cover_all_positions():
    from unicon_dist.solver.layout import cut_panels

    labels = np.repeat(np.arange(6), [3, 1, 9, 2, 2, 5])
    panels = cut_panels(labels, labels.size, 4)
    assert panels[0][0] == 0 and panels[-1][1] == labels.size
    assert all(a[1] == b[0] for a, b in zip(panels[:-1], panels[1:]))
    for p0, p1 in panels:
        assert p0 == 0 or labels[p0] != labels[p0 - 1]  # a group starts at every cut
    assert (2, 4) not in panels and (4, 13) in panels  # the group of 9 gets its own panel
    assert cut_panels(None, 10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_from_loader_reads_panels_on_demand_and_equals_in_memory():
    n = 400
    phi_x, phi_y, z_x, z_y = make_problem(n, seed=11)
    groups = make_groups("shuffled", n, seed=5)
    tensors = [torch.as_tensor(a, dtype=torch.float32) for a in (phi_x, phi_y, z_x, z_y)]
    requested = []

    def loader(rows):
        requested.append(rows)
        idx = torch.arange(n)[rows] if isinstance(rows, slice) else torch.as_tensor(rows)
        return tuple(t[idx] for t in tensors)

    kw = dict(loss="clip", temperature=0.1, groups=groups, block_rows=32, block_cols=64)
    ref = ud.CrossProductOperator(*tensors, **kw)
    op = ud.CrossProductOperator.from_loader(loader, n, (7, 5), 6, panel_rows=90, norm_bound=(1.0, 1.0), **kw)
    assert max(np.arange(n)[r].size if isinstance(r, slice) else len(r) for r in requested) <= 90
    assert op.loss == pytest.approx(ref.loss, rel=1e-6)
    assert rel_err(op.materialize().numpy(), ref.materialize().numpy()) < 1e-5
    panels = len(op.batches[0].panels)
    loads = op.n_loads
    op.materialize()
    # each row panel is loaded and every other panel streamed past it; the last row panel is
    # still cached from the previous row's sweep
    assert panels == 5 and op.n_loads - loads == panels * panels - 1


def test_from_loader_constant_first_step_needs_one_sweep():
    n = 300
    phi_x, phi_y, _, _ = make_problem(n, seed=2)
    zeros = np.zeros((n, 1))
    tensors = [torch.as_tensor(a) for a in (phi_x, phi_y, zeros, zeros)]
    loader = lambda rows: tuple(t[rows] for t in tensors)  # noqa: E731
    op = ud.CrossProductOperator.from_loader(loader, n, (7, 5), 1, constant=True, panel_rows=64,
                                             dtype=torch.float64, temperature=0.1)
    assert op.n_loads == 5  # the positives' statistics: one read of each panel
    C_ref, l_ref = dense_reference(phi_x, phi_y, zeros, zeros, "clip", 0.1)
    assert rel_err(op.materialize().numpy(), C_ref) < 1e-12
    assert op.loss == pytest.approx(l_ref, rel=1e-12)


@pytest.mark.parametrize("gkind", ["none", "shuffled"])
def test_contiguous_batches_equal_dense(gkind):
    n, B = 350, 64
    phi_x, phi_y, z_x, z_y = make_problem(n, seed=21)
    groups = make_groups(gkind, n, seed=3)
    op = ud.CrossProductOperator(phi_x, phi_y, z_x, z_y, temperature=0.1, negatives=B, groups=groups,
                                 batch_split="contiguous", block_rows=17, block_cols=29, panel_rows=150)
    px, py, zx, zy = (np.asarray(a, dtype=np.float64) for a in (phi_x, phi_y, z_x, z_y))
    C_ref, l_ref = np.zeros((7, 5)), 0.0
    for a in range(0, n, B):  # consecutive rows, each batch weighted by its share of n
        idx = np.arange(a, min(a + B, n))
        g = None if groups is None else np.asarray(groups)[idx]
        s_b = zx[idx] @ zy[idx].T
        C_ref += px[idx].T @ ud.similarity_weights(s_b, temperature=0.1, groups=g) @ py[idx] * (len(idx) / n)
        l_ref += ud.contrastive_loss(s_b, temperature=0.1, groups=g) * len(idx) / n
    assert rel_err(op.materialize().numpy(), C_ref) < 1e-9
    assert op.loss == pytest.approx(l_ref, rel=1e-10)
    with pytest.raises(ValueError, match="batch_split must be one of"):
        ud.CrossProductOperator(phi_x, phi_y, z_x, z_y, negatives=B, batch_split="sorted")


# --------------------------------------------------------------------------------------
# the passes split over workers that each own some outer panels (what RayExecutor runs)
# --------------------------------------------------------------------------------------
def split_run(make, n_workers):
    """A driver and workers built by ``make(owned=..., compute_stats=False)``; the panels are
    dealt out in contiguous runs; returns (driver, workers) with the statistics installed."""
    driver = make(owned=[], compute_stats=False)
    keys = driver.panel_keys
    shares = [keys[w * len(keys) // n_workers:(w + 1) * len(keys) // n_workers] for w in range(n_workers)]
    workers = [make(owned=share, compute_stats=False) for share in shares]
    owners = {}
    for w, share in enumerate(shares):
        for b, _ in share:
            owners.setdefault(b, set()).add(w)
    split = [b for b, ws in owners.items() if len(ws) > 1]
    stats = driver.compute_stats(lambda name, *args: [w.run_round(name, *args) for w in workers], split)
    for op in (driver, *workers):
        op.set_stats(stats)
    return driver, workers, split


SPLIT_CASES = [
    # (loss, n, groups kind, negatives, panel_rows, scale, constant, workers)
    ("clip", 400, "none", "full", 90, 1.0, False, 2),
    ("clip", 400, "none", "full", 90, 9.0, False, 3),  # log-space statistics
    ("clip", 400, "shuffled", "full", 90, 1.0, False, 2),
    ("clip", 400, "shuffled", "full", 90, 1.0, True, 3),  # the s = 0 first step
    ("clip", 400, "shuffled", 96, 200, 1.0, False, 2),  # whole batches per worker
    ("clip", 400, "none", 150, 60, 1.0, False, 3),  # batches shared by workers
    ("triplet", 160, "shuffled", "full", 45, 1.0, False, 2),
    ("sigmoid", 160, "none", "full", 45, 1.0, True, 2),
]


@pytest.mark.parametrize("loss, n, gkind, negatives, panel_rows, scale, constant, n_workers", SPLIT_CASES)
def test_passes_split_over_workers_equal_one_pass(loss, n, gkind, negatives, panel_rows, scale, constant, n_workers):
    phi_x, phi_y, z_x, z_y = make_problem(n, seed=n + 5, scale=scale)
    if constant:
        z_x = z_y = np.zeros((n, 1))
    tensors = [torch.as_tensor(a, dtype=torch.float32) for a in (phi_x, phi_y, z_x, z_y)]
    loader = lambda rows: tuple(t[rows] if isinstance(rows, slice) else t[torch.as_tensor(rows)] for t in tensors)  # noqa: E731
    kw = dict(loss=loss, temperature=TEMPS[loss], negatives=negatives, groups=make_groups(gkind, n, seed=2),
              panel_rows=panel_rows, block_rows=23, block_cols=41, constant=constant)
    make = lambda **extra: ud.CrossProductOperator.from_loader(loader, n, (7, 5), z_x.shape[1], **kw, **extra)  # noqa: E731
    whole = make()
    driver, workers, split = split_run(make, n_workers)
    assert driver.n_loads == 0
    assert whole.loss == pytest.approx(driver.loss, rel=1e-6)
    C = sum(w.materialize() for w in workers)
    assert rel_err(C.numpy(), whole.materialize().numpy()) < 1e-6
    omega = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert rel_err(sum(w.matmul(omega) for w in workers).numpy(), whole.matmul(omega).numpy()) < 1e-6
    omega = torch.randn(7, 2, generator=torch.Generator().manual_seed(1))
    assert rel_err(sum(w.rmatmul(omega) for w in workers).numpy(), whole.rmatmul(omega).numpy()) < 1e-6
    if negatives == "full":
        assert split  # the one batch is shared, so the merge rounds ran
