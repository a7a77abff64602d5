"""Loss family and S(γ) = −∂L/∂s (DESIGN §2) against independent references."""

import math
import zlib

import numpy as np
import pytest
import torch

import unicon_dist as ud
from unicon_dist import losses as L

from _refs import naive_loss, naive_weights, ref_loss_object, uneven_groups

# temperatures chosen so s/τ is O(1) for s ~ 0.3·N(0, 1)
TEMPS = {"clip": 0.25, "triplet": 0.1, "sigmoid": 0.2}
GROUPINGS = {
    "one_to_one": None,
    "sizes_1234": uneven_groups([1, 2, 3, 4]),
    "sizes_1234_shuffled": uneven_groups([1, 2, 3, 4], rng=np.random.default_rng(7), shuffle=True),
    "sizes_3_1_2_1": uneven_groups([3, 1, 2, 1], rng=np.random.default_rng(8), shuffle=True),
}


def _sim(n, seed, scale=0.3):
    return scale * np.random.default_rng(seed).standard_normal((n, n))


def _seed(*parts):
    return zlib.crc32(repr(parts).encode()) % 10_000


def _n_for(groups, default=8):
    return default if groups is None else len(groups)


# --------------------------------------------------------------------------------------
# contrastive_loss against a literal double loop
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("nu", [1.0, 1.5])
@pytest.mark.parametrize("name", ["clip", "triplet", "sigmoid"])
def test_loss_matches_naive_loop(name, nu, grouping):
    groups = GROUPINGS[grouping]
    n = _n_for(groups)
    s = _sim(n, seed=_seed(name, nu, grouping))
    tau = TEMPS[name]
    ref = float(naive_loss(torch.tensor(s), ref_loss_object(name, tau, nu), groups))
    got = ud.contrastive_loss(s, loss=name, temperature=tau, nu=nu, groups=groups)
    assert isinstance(got, float)
    assert got == pytest.approx(ref, rel=1e-12, abs=1e-12)


def test_infonce_alias_and_default_temperature():
    s = _sim(7, 3)
    a = ud.contrastive_loss(s, loss="infonce", temperature=0.3)
    b = ud.contrastive_loss(s, loss="clip", temperature=0.3)
    assert a == pytest.approx(b, rel=1e-14)
    ref = float(naive_loss(torch.tensor(s), ref_loss_object("clip", 0.07, 1.0)))
    assert ud.contrastive_loss(s) == pytest.approx(ref, rel=1e-12)


def test_clip_one_to_one_is_scaled_symmetric_cross_entropy():
    """ν = 1 one-to-one CLIP = τ/(2n) Σ_i [lse_j(s_ij/τ) − s_ii/τ] + the column term."""
    n, tau = 9, 0.2
    s = _sim(n, 11)
    t = s / tau
    row = sum(math.log(sum(math.exp(t[i, j]) for j in range(n))) - t[i, i] for i in range(n))
    col = sum(math.log(sum(math.exp(t[i, j]) for i in range(n))) - t[j, j] for j in range(n))
    ref = tau * (row + col) / (2 * n)
    assert ud.contrastive_loss(s, temperature=tau) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize(
    "obj, ref",
    [
        (lambda: L.InfoNCE(temperature=0.3, nu=1.5, epsilon=0.5), lambda: ref_loss_object("clip", 0.3, 1.5, 0.5)),
        (lambda: L.SmoothedTriplet(margin=0.1, smoothing=0.08, nu=1.0, epsilon=2.0), None),
        (lambda: L.PairwiseSigmoid(temperature=0.15, bias=-0.7, nu=1.5, epsilon=0.75), None),
    ],
    ids=["infonce", "triplet", "sigmoid"],
)
@pytest.mark.parametrize("grouping", ["one_to_one", "sizes_1234_shuffled"])
def test_loss_objects_with_epsilon(obj, ref, grouping):
    lo = obj()
    if ref is None:
        if isinstance(lo, L.SmoothedTriplet):
            from _refs import RefTriplet

            ref_obj = RefTriplet(lo.smoothing, margin=lo.margin, nu=lo.nu, epsilon=lo.epsilon)
        else:
            from _refs import RefSigmoid

            ref_obj = RefSigmoid(lo.temperature, bias=lo.bias, nu=lo.nu, epsilon=lo.epsilon)
    else:
        ref_obj = ref()
    groups = GROUPINGS[grouping]
    n = _n_for(groups)
    s = _sim(n, 21)
    got = ud.contrastive_loss(s, loss=lo, groups=groups)
    want = float(naive_loss(torch.tensor(s), ref_obj, groups))
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    S = ud.similarity_weights(s, loss=lo, groups=groups)
    S_ref, _ = naive_weights(s, ref_obj, groups)
    np.testing.assert_allclose(S, S_ref, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------
# S(γ) = −∂L/∂s
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("nu", [1.0, 1.5])
@pytest.mark.parametrize("name", ["clip", "triplet", "sigmoid"])
def test_weights_equal_minus_autograd_of_library_loss(name, nu, grouping):
    groups = GROUPINGS[grouping]
    n = _n_for(groups)
    s = _sim(n, seed=1 + _seed(name, nu, grouping))
    tau = TEMPS[name]
    st = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    val = ud.contrastive_loss(st, loss=name, temperature=tau, nu=nu, groups=groups)
    assert isinstance(val, torch.Tensor) and val.ndim == 0
    (grad,) = torch.autograd.grad(val, st)
    S = ud.similarity_weights(s, loss=name, temperature=tau, nu=nu, groups=groups)
    assert isinstance(S, np.ndarray) and S.dtype == np.float64 and S.shape == (n, n)
    np.testing.assert_allclose(S, -grad.numpy(), rtol=0, atol=1e-10)
    # and against autograd of the independent naive loss (checks the loss as well)
    S_ref, _ = naive_weights(s, ref_loss_object(name, tau, nu), groups)
    np.testing.assert_allclose(S, S_ref, rtol=0, atol=1e-10)
    assert np.abs(S).max() > 1e-4  # not trivially zero


@pytest.mark.parametrize("name", ["clip", "triplet", "sigmoid"])
def test_weights_torch_in_torch_out(name):
    s = torch.tensor(_sim(6, 5))
    S = ud.similarity_weights(s, loss=name, temperature=TEMPS[name])
    assert isinstance(S, torch.Tensor) and S.shape == (6, 6) and S.dtype == torch.float64
    S_np = ud.similarity_weights(s.numpy(), loss=name, temperature=TEMPS[name])
    np.testing.assert_allclose(S.numpy(), S_np, rtol=0, atol=1e-14)


@pytest.mark.parametrize("nu", [1.0, 1.5])
def test_clip_one_to_one_closed_form(nu):
    n, tau = 10, 0.15
    s = _sim(n, 42)
    e = np.exp(s / tau)
    P = e / e.sum(1, keepdims=True)  # row softmax
    Pbar = e / e.sum(0, keepdims=True)  # column softmax
    S_ref = (2 * nu * np.eye(n) - P - Pbar) / (2 * n)
    S = ud.similarity_weights(s, loss="clip", temperature=tau, nu=nu)
    np.testing.assert_allclose(S, S_ref, rtol=0, atol=1e-13)
    # ψ = exp: the negative weights do not depend on ν
    S1 = ud.similarity_weights(s, loss="clip", temperature=tau, nu=1.0)
    off = ~np.eye(n, dtype=bool)
    np.testing.assert_allclose(S[off], S1[off], rtol=1e-12, atol=0)


def test_clip_weights_at_zero_similarity_centre():
    """s = 0, ν = 1, one-to-one: S = H/n with H the centring matrix (used by the first step)."""
    n = 7
    S = ud.similarity_weights(np.zeros((n, n)), loss="clip", temperature=0.07)
    H = np.eye(n) - np.ones((n, n)) / n
    np.testing.assert_allclose(S, H / n, rtol=0, atol=1e-15)


def test_weights_groups_relabeling_invariant():
    """Group ids are labels only: any relabelling gives the same S; permuting rows+cols permutes S."""
    rng = np.random.default_rng(3)
    g = uneven_groups([2, 1, 3, 2], rng=rng, shuffle=True)
    s = _sim(len(g), 9)
    S = ud.similarity_weights(s, temperature=0.3, groups=g)
    S2 = ud.similarity_weights(s, temperature=0.3, groups=1000 - 7 * g)
    np.testing.assert_allclose(S, S2, rtol=0, atol=1e-15)
    p = rng.permutation(len(g))
    S3 = ud.similarity_weights(s[p][:, p], temperature=0.3, groups=g[p])
    np.testing.assert_allclose(S3, S[p][:, p], rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["clip", "triplet", "sigmoid"])
def test_extreme_similarities_are_finite(name):
    """|s/τ| ≈ 100 must not overflow (log-space evaluation)."""
    n = 8
    rng = np.random.default_rng(0)
    s = rng.uniform(-1, 1, (n, n))
    tau = 0.01
    S = ud.similarity_weights(s, loss=name, temperature=tau)
    val = ud.contrastive_loss(s, loss=name, temperature=tau)
    assert np.all(np.isfinite(S)) and math.isfinite(val)
    if name == "clip":
        t = s / tau
        P = np.exp(t - t.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        Pb = np.exp(t - t.max(0, keepdims=True))
        Pb /= Pb.sum(0, keepdims=True)
        np.testing.assert_allclose(S, (2 * np.eye(n) - P - Pb) / (2 * n), rtol=0, atol=1e-13)


# --------------------------------------------------------------------------------------
# loss objects: φ', ψ' are the derivatives of φ, ψ; φ, ψ are the documented functions
# --------------------------------------------------------------------------------------
LOSS_OBJECTS = [
    L.InfoNCE(temperature=0.2, nu=1.5),
    L.SmoothedTriplet(margin=0.2, smoothing=0.05),
    L.SmoothedTriplet(margin=-0.1, smoothing=0.3, nu=1.5),
    L.PairwiseSigmoid(temperature=0.1, bias=0.5),
]


@pytest.mark.parametrize("lo", LOSS_OBJECTS, ids=lambda o: f"{o.name}")
def test_loss_object_derivatives_match_autograd(lo):
    x = torch.linspace(-1.0, 1.0, 401, dtype=torch.float64)
    # avoid evaluating exactly on a kink of the smoothed hinge
    x = x + 1e-7
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(lo.psi(xr).sum(), xr)
    np.testing.assert_allclose(lo.dpsi(x).numpy(), g.numpy(), rtol=1e-10, atol=1e-10)
    a = torch.linspace(0.05, 5.0, 200, dtype=torch.float64)
    ar = a.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(lo.phi(ar).sum(), ar)
    np.testing.assert_allclose(lo.dphi(a).numpy(), ga.numpy(), rtol=1e-10, atol=1e-12)
    assert lo.nu == pytest.approx(lo.nu) and lo.epsilon == 1.0


@pytest.mark.parametrize("lo", LOSS_OBJECTS, ids=lambda o: f"{o.name}")
def test_loss_object_functions_match_definitions(lo):
    xs = np.linspace(-1.0, 1.0, 57) + 1e-9
    if isinstance(lo, L.InfoNCE):
        ref = ref_loss_object("clip", lo.temperature, lo.nu)
    elif isinstance(lo, L.SmoothedTriplet):
        from _refs import RefTriplet

        ref = RefTriplet(lo.smoothing, margin=lo.margin, nu=lo.nu)
    else:
        from _refs import RefSigmoid

        ref = RefSigmoid(lo.temperature, bias=lo.bias, nu=lo.nu)
    for x in xs:
        xt = torch.tensor(x, dtype=torch.float64)
        assert float(lo.psi(xt)) == pytest.approx(float(ref.psi(xt)), rel=1e-12, abs=1e-14)
    for a in [0.1, 0.7, 1.0, 3.5]:
        at = torch.tensor(a, dtype=torch.float64)
        assert float(lo.phi(at)) == pytest.approx(float(ref.phi(at)), rel=1e-12, abs=1e-14)


def test_string_losses_map_parameters():
    """For "triplet" the temperature is the smoothing width; nu is passed through."""
    s = _sim(6, 77)
    a = ud.contrastive_loss(s, loss="triplet", temperature=0.09, nu=1.5)
    b = ud.contrastive_loss(s, loss=L.SmoothedTriplet(smoothing=0.09, nu=1.5))
    assert a == pytest.approx(b, rel=1e-14)
    c = ud.contrastive_loss(s, loss="sigmoid", temperature=0.3, nu=1.5)
    d = ud.contrastive_loss(s, loss=L.PairwiseSigmoid(temperature=0.3, nu=1.5))
    assert c == pytest.approx(d, rel=1e-14)
    # and the parameters matter (guards against silently ignored arguments)
    assert ud.contrastive_loss(s, loss="triplet", temperature=0.3) != pytest.approx(
        ud.contrastive_loss(s, loss="triplet", temperature=0.01), rel=1e-6
    )
