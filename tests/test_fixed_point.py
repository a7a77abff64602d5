"""The fixed-point iteration on a fake operator: a dense C(W) of small arrays.

:func:`unicon_dist.solver.fixed_point.solve` only sees the operator's ``loss``,
``shape``, ``materialize``, ``matmul``, ``rmatmul`` and ``release``.  Here C(W) =
Φ_Xᵀ S(γ)(Φ_X W Φ_Yᵀ) Φ_Y is formed densely with
:func:`unicon_dist.math.dense.similarity_weights`, and every iterate, residual, stop reason and
the iterate kept are checked against a reference loop written below with numpy's SVD.  The
two differ only in round-off (torch and LAPACK orderings), so iterates are compared to
1e-9 relative -- far above float64 round-off of these 40×6 problems, far below the
differences between iterates -- while stop reasons, iteration counts and the kept
iterate must match exactly (the problems are chosen away from the thresholds).
"""

import dataclasses

import numpy as np
import pytest
import torch

from unicon_dist.math.dense import contrastive_loss, similarity_weights
from unicon_dist.solver.anderson import AndersonSteps
from unicon_dist.solver.fixed_point import FixedPointOptions, FixedPointState, solve

RANK, RHO = 2, 1.0


def _views(n=40, dx=6, dy=5, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, 3))
    X = Z @ rng.standard_normal((3, dx)) + 0.4 * rng.standard_normal((n, dx))
    Y = Z @ rng.standard_normal((3, dy)) + 0.4 * rng.standard_normal((n, dy))
    # on this scale the plain map oscillates at τ = 0.5 and converges damped or at τ = 2
    return (X - X.mean(0)) / 3, (Y - Y.mean(0)) / 3


class DenseOperator:
    """C at the encoders F1, F2 (None: s = 0) for "dot" similarity, formed densely."""

    built = []

    def __init__(self, X, Y, F1, F2, temperature):
        X, Y = torch.as_tensor(X), torch.as_tensor(Y)
        W = torch.zeros((X.shape[1], Y.shape[1]), dtype=torch.float64) if F1 is None else \
            (torch.as_tensor(F1, dtype=torch.float64).T @ torch.as_tensor(F2, dtype=torch.float64))
        s = X @ W @ Y.T
        self.C = X.T @ similarity_weights(s, temperature=temperature) @ Y
        self.loss = float(contrastive_loss(s, temperature=temperature))
        self.shape = tuple(self.C.shape)
        self.released = False
        DenseOperator.built.append(self)

    def materialize(self):
        return self.C.clone()

    def matmul(self, omega):
        return self.C @ omega.to(self.C)

    def rmatmul(self, omega):
        return self.C.T @ omega.to(self.C)

    def release(self):
        self.released = True


def _truncate(M, rank):
    U, s, Vt = np.linalg.svd(M)
    return (U[:, :rank] * s[:rank]) @ Vt[:rank]


def _residual(C, W):
    """‖P_T(ρW − C)‖/‖P_T(C)‖ with P_T from numpy's SVD of W: the "dot" certificate, written anew."""
    U, _, Vt = np.linalg.svd(W)
    U, V = U[:, :RANK], Vt[:RANK].T

    def pt(Z):
        return U @ U.T @ Z + Z @ V @ V.T - U @ U.T @ Z @ V @ V.T

    return np.linalg.norm(pt(RHO * W - C)) / np.linalg.norm(pt(C))


def reference(X, Y, temperature, *, damping=1.0, tol=0.0, loss_tol=0.0, max_iter=10, W0=None):
    """The map of DESIGN §2 for "dot" similarity and the "sqrt" factorization, from scratch.

    W_1 = [C(0)]_r/ρ (or W0); each iteration evaluates W_k: C(W_k), L(W_k) and the
    residual of W_k; then W_{k+1} = [M_k]_r/ρ with M_k = C(W_k), or, damped,
    η C(W_k) + (1 − η) ρ W_k (a projected gradient step of length η/ρ on L + R).  Stops at
    residual ≤ tol ("converged", keeping W_k), at a relative decrease of L + R below
    loss_tol ("loss plateau", keeping the iterate of lowest L + R), or at max_iter, keeping
    the iterate of lowest residual (of lowest L + R when loss_tol > 0).
    """
    def at(W):
        s = X @ W @ Y.T
        return X.T @ similarity_weights(s, temperature=temperature) @ Y, contrastive_loss(s, temperature=temperature)

    W = _truncate(at(np.zeros((X.shape[1], Y.shape[1])))[0], RANK) / RHO if W0 is None else W0
    iterates, criteria, deltas, residuals = [], [], [1.0 if W0 is None else None], []
    for k in range(1, max_iter + 1):
        C, loss = at(W)
        iterates.append(W)
        criteria.append(loss + 0.5 * RHO * np.linalg.norm(W) ** 2)
        residuals.append(_residual(C, W))
        if residuals[-1] <= tol:
            return iterates, criteria, deltas, residuals, "converged", k
        if k > 1 and loss_tol > 0 and criteria[-2] - criteria[-1] < loss_tol * abs(criteria[-1]):
            return iterates, criteria, deltas, residuals, "loss plateau", int(np.argmin(criteria)) + 1
        if k == max_iter:
            break
        M = damping * C + (1 - damping) * RHO * W if damping < 1 else C
        W_new = _truncate(M, RANK) / RHO
        deltas.append(np.linalg.norm(W_new - W) / np.linalg.norm(W_new))
        W = W_new
    kept = criteria if loss_tol > 0 else residuals
    return iterates, criteria, deltas, residuals, "max_iter", int(np.argmin(kept)) + 1


def run(X, Y, temperature, *, operator=None, init=None, resume=None, **options):
    """``solve`` on the dense operator (or ``operator``), "dot" and "sqrt" unless told; the
    result and a copy of the state after every step."""
    options = FixedPointOptions(**{"rank": RANK, "rho": RHO, "factorization": "sqrt", "similarity": "dot",
                                   "damping": 1.0, "tol": 0.0, "loss_tol": 0.0, "solver": "plain", **options})
    states = []
    make = operator or (lambda F1, F2: DenseOperator(X, Y, F1, F2, temperature))
    result = solve(make, (X.shape[1], Y.shape[1]), options, torch.device("cpu"), init=init, resume=resume,
                   on_step=lambda s: states.append(dataclasses.replace(s, history=[dict(h) for h in s.history])))
    return result, states


def _close(A, B):
    A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    return np.linalg.norm(A - B) <= 1e-9 * np.linalg.norm(B)


# ------------------------------------------------------------------ the iterates
@pytest.mark.parametrize("damping", [1.0, 0.5])
def test_iterates_and_losses_follow_the_reference_map(damping):
    X, Y = _views()
    DenseOperator.built = []
    result, states = run(X, Y, 0.5, damping=damping, max_iter=5)
    iterates, criteria, deltas, residuals, reason, best = reference(X, Y, 0.5, damping=damping, max_iter=5)
    assert result.stop_reason == reason == "max_iter" and result.n_iter == 5 and not result.converged
    assert [s.iteration for s in states] == [1, 2, 3, 4, 5]
    # the state after iteration k holds the next point W_{k+1} (the last one: W_5 itself)
    for state, W in zip(states, iterates[1:] + [iterates[-1]]):
        assert _close(state.W, W)
        assert _close(state.F1.T @ state.F2, W)  # the "sqrt" factors of W
    np.testing.assert_allclose([h["objective"] for h in result.history], criteria, rtol=1e-10)
    np.testing.assert_allclose([h["delta_w"] for h in result.history], deltas, rtol=1e-8)
    np.testing.assert_allclose([h["residual"] for h in result.history], residuals, rtol=1e-8)
    assert result.initial_loss == pytest.approx(np.log(X.shape[0]) * 0.5, rel=1e-12)  # L(0) = τ log n
    assert result.best_iteration == best and _close(result.W, iterates[best - 1])
    assert result.loss == result.history[best - 1]["loss"]
    # every operator built is released, the last one too; C of the kept iterate is returned
    assert len(DenseOperator.built) == 6 and all(op.released for op in DenseOperator.built)
    assert result.C is not None and result.C.shape == (6, 5)
    assert set(result.history[0]["phases"]) == {"tiles", "svd"}  # an operator that keeps no times


def test_a_warm_start_evaluates_the_given_encoders_first():
    X, Y = _views()
    first, _ = run(X, Y, 0.5, max_iter=2)
    W0 = (first.F1.T @ first.F2).numpy()
    result, states = run(X, Y, 0.5, damping=0.5, max_iter=3, init=(first.F1, first.F2))
    iterates, *_ = reference(X, Y, 0.5, damping=0.5, max_iter=3, W0=W0)
    assert _close(iterates[0], W0) and result.history[0]["step"] == "warm start"
    assert all(_close(s.W, W) for s, W in zip(states, iterates[1:]))


# ------------------------------------------------------------------ stopping
def test_converged_when_the_residual_is_below_tol():
    X, Y = _views()
    iterates, _, _, residuals, reason, best = reference(X, Y, 0.5, damping=0.5, tol=1e-6, max_iter=200)
    assert reason == "converged" and 2 < best < 200
    assert residuals[-1] < 0.9e-6 and residuals[-2] > 1.1e-6  # away from the threshold
    result, _ = run(X, Y, 0.5, damping=0.5, tol=1e-6, max_iter=200)
    assert result.stop_reason == "converged" and result.converged
    assert result.n_iter == result.best_iteration == best
    assert _close(result.W, iterates[-1]) and result.history[-1]["residual"] <= 1e-6


def test_loss_plateau_only_when_asked_for():
    X, Y = _views()
    _, criteria, _, _, reason, best = reference(X, Y, 0.5, damping=0.5, loss_tol=5e-4, max_iter=50)
    k = len(criteria)
    assert reason == "loss plateau" and 2 < k < 50
    # away from the threshold: the decisive decrease is clearly below it, the one before clearly above
    assert criteria[-2] - criteria[-1] < 0.5 * 5e-4 * abs(criteria[-1])
    assert criteria[-3] - criteria[-2] > 2 * 5e-4 * abs(criteria[-2])
    result, _ = run(X, Y, 0.5, damping=0.5, loss_tol=5e-4, max_iter=50)
    assert result.stop_reason == "loss plateau" and not result.converged
    assert result.n_iter == k and result.best_iteration == best
    never, _ = run(X, Y, 0.5, damping=0.5, loss_tol=0.0, max_iter=k + 3)  # the default: no plateau stop
    assert never.stop_reason == "max_iter" and never.n_iter == k + 3


def test_the_plain_map_oscillates_and_keeps_its_lowest_residual_iterate():
    # τ = 0.5 undamped: a 2-cycle whose objective rises after the first step; the iterate
    # kept is the one closest to a fixed point, not the one of lowest objective
    X, Y = _views()
    iterates, criteria, _, residuals, reason, best = reference(X, Y, 0.5, max_iter=5)
    assert reason == "max_iter" and min(criteria[1:]) > criteria[0] + 1e-3
    assert min(residuals) > 0.5  # nowhere near a fixed point
    assert best == int(np.argmin(residuals)) + 1 != 1  # the two rules disagree here
    assert sorted(residuals)[1] > 1.01 * min(residuals)  # and the minimum is clear
    result, _ = run(X, Y, 0.5, max_iter=5)
    assert result.stop_reason == "max_iter" and result.best_iteration == best and _close(result.W, iterates[best - 1])
    assert result.loss == result.history[best - 1]["loss"]


# ------------------------------------------------------------------ Anderson mixing
def _map_at(X, Y, temperature, W):
    """[C(W)]_r/ρ evaluated densely with numpy: the map whose fixed point is claimed."""
    s = X @ W @ Y.T
    return _truncate(X.T @ np.asarray(similarity_weights(s, temperature=temperature)) @ Y, RANK) / RHO


@pytest.mark.parametrize("damping", [1.0, 0.5])
def test_anderson_reaches_the_fixed_point_where_the_plain_map_cycles(damping):
    X, Y = _views()
    result, _ = run(X, Y, 0.5, solver="anderson", damping=damping, tol=1e-9, max_iter=30)
    assert result.stop_reason == "converged" and result.n_iter <= 20
    W = result.W.numpy()
    # the certificate, recomputed with numpy (1 % above tol: the two differ in round-off of
    # 40×6 float64 products), and the fixed-point equation itself: W = [C(W)]_r/ρ
    C = X.T @ np.asarray(similarity_weights(X @ W @ Y.T, temperature=0.5)) @ Y
    assert _residual(C, W) <= 1.01e-9
    assert np.linalg.norm(_map_at(X, Y, 0.5, W) - W) <= 1e-7 * np.linalg.norm(W)
    steps = [h["step"] for h in result.history]
    assert steps[0] == "first step (s = 0)" and any(s.startswith("anderson(") for s in steps)


def test_a_bad_extrapolation_is_rejected_and_the_damped_map_taken_instead(monkeypatch):
    X, Y = _views()
    clean, _ = run(X, Y, 2.0, solver="anderson", tol=1e-9, max_iter=30)
    planted = {"calls": 0}
    original = AndersonSteps._extrapolate

    def bad_once(self, options):
        Z, used = original(self, options)
        planted["calls"] += 1
        if planted["calls"] == 2:  # the second extrapolation lands far from anything sensible
            Z = Z + 5.0 * torch.linalg.norm(Z) * torch.as_tensor(np.random.default_rng(0).standard_normal(Z.shape))
        return Z, used

    monkeypatch.setattr(AndersonSteps, "_extrapolate", bad_once)
    result, _ = run(X, Y, 2.0, solver="anderson", tol=1e-9, max_iter=30)
    k = next(i for i, h in enumerate(result.history) if not h["accepted"])
    bad, after = result.history[k], result.history[k + 1]
    assert bad["step"].startswith("anderson(") and bad["residual"] > 2 * min(h["residual"] for h in result.history[:k])
    assert after["step"].startswith("damped map") and "rejected" in after["step"]
    # back from the last accepted point: no worse than the damped map from there
    assert after["residual"] < bad["residual"]
    assert result.stop_reason == "converged" and result.n_iter <= clean.n_iter + 6
    assert np.linalg.norm(result.W.numpy() - clean.W.numpy()) <= 1e-7 * np.linalg.norm(clean.W.numpy())


# ------------------------------------------------------------------ the iterate kept
class ScriptedLoss(DenseOperator):
    """The dense operator reporting a scripted loss: L(0) first, then one value per evaluation."""

    script = []

    def __init__(self, *args):
        super().__init__(*args)
        self.loss = ScriptedLoss.script[len(DenseOperator.built) - 1]


def test_a_loss_plateau_stop_keeps_the_lowest_criterion():
    X, Y = _views()
    DenseOperator.built, ScriptedLoss.script = [], [10.0, 3.0, 1.0, 2.0, 4.0]
    iterates, *_ = reference(X, Y, 0.5, max_iter=4)
    result, states = run(X, Y, 0.5, operator=lambda F1, F2: ScriptedLoss(X, Y, F1, F2, 0.5),
                         similarity="cosine", loss_tol=1e-12, max_iter=6)
    # cosine similarity compares iterates by L alone: the loss rises at iteration 3, a
    # plateau, and iteration 2 has the lowest
    assert result.stop_reason == "loss plateau" and result.n_iter == 3
    assert result.best_iteration == 2 and result.loss == 1.0
    assert _close(result.W, iterates[1]) and torch.equal(result.W, states[1].best[4])
    assert [s.best[1] for s in states] == [1, 2, 2]
    assert result.C is not None and torch.equal(result.C, DenseOperator.built[2].C)  # C at the iterate kept


def test_a_fixed_point_is_kept_even_when_an_earlier_iterate_had_a_lower_criterion():
    X, Y = _views()
    _, _, _, residuals, _, _ = reference(X, Y, 2.0, max_iter=2)
    assert residuals[1] < 0.15 and residuals[0] > 0.25  # tol = 0.2 stops at iteration 2
    DenseOperator.built, ScriptedLoss.script = [], [10.0, 1.0, 5.0]
    result, _ = run(X, Y, 2.0, operator=lambda F1, F2: ScriptedLoss(X, Y, F1, F2, 2.0), tol=0.2, max_iter=5)
    assert result.stop_reason == "converged" and result.n_iter == result.best_iteration == 2
    assert result.loss == 5.0


# ------------------------------------------------------------------ resuming
@pytest.mark.parametrize("solver", ["plain", "anderson"])
def test_resuming_after_iteration_k_ends_with_the_uninterrupted_result_bit_for_bit(solver):
    X, Y = _views()
    full, states = run(X, Y, 0.5, damping=0.5, solver=solver, max_iter=9)
    resumed, later = run(X, Y, 0.5, damping=0.5, solver=solver, max_iter=9, resume=states[4])
    assert [s.iteration for s in later] == [6, 7, 8, 9]
    for attr in ("F1", "F2", "W", "C"):
        assert torch.equal(getattr(resumed, attr), getattr(full, attr)), attr
    for key in ("loss", "residual", "delta_w", "step", "accepted"):
        assert [h[key] for h in resumed.history] == [h[key] for h in full.history], key
    assert (resumed.best_iteration, resumed.stop_reason, resumed.initial_loss) == (
        full.best_iteration, full.stop_reason, full.initial_loss)
    if solver == "anderson":  # the secant history was carried, not rebuilt
        assert states[4].solver["policy"]["n_points"] > 1
        assert resumed.history[5]["step"].startswith("anderson(")


def test_a_finished_state_is_only_returned():
    X, Y = _views()
    full, states = run(X, Y, 0.5, max_iter=3)
    assert states[-1].finished
    DenseOperator.built = []
    again, later = run(X, Y, 0.5, max_iter=3, resume=states[-1])
    assert DenseOperator.built == [] and later == []  # no operator, no step
    assert torch.equal(again.W, full.W) and again.stop_reason == full.stop_reason and again.C is None
    assert isinstance(states[-1], FixedPointState)
