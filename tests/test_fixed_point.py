"""The fixed-point iteration on a fake operator: a dense C(W) of small arrays.

:func:`unicon_dist.solver.fixed_point.solve` only sees the operator's ``loss``,
``shape``, ``materialize``, ``matmul``, ``rmatmul`` and ``release``.  Here C(W) =
Φ_Xᵀ S(γ)(Φ_X W Φ_Yᵀ) Φ_Y is formed densely with
:func:`unicon_dist.math.dense.similarity_weights`, and every iterate, stop reason and the
iterate kept are checked against a reference loop written below with numpy's SVD.  The
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


def reference(X, Y, temperature, *, damping=1.0, tol=0.0, loss_tol=0.0, max_iter=10, W0=None):
    """The map of DESIGN §2 for "dot" similarity and the "sqrt" factorization, from scratch.

    W_k = [M_k]_r/ρ with M_k = C(W_{k−1}), or, damped, η C(W_{k−1}) + (1 − η) ρ W_{k−1}
    (a projected gradient step of length η/ρ on L + R); the first step from s = 0 is
    undamped.  Stops at ‖ΔW‖/‖W‖ < tol ("converged"), at a relative decrease of
    L + R below loss_tol ("loss plateau"), or at max_iter; keeps the fixed point, else the
    iterate of lowest L + R.
    """
    def at(W):
        s = X @ W @ Y.T
        return X.T @ similarity_weights(s, temperature=temperature) @ Y, contrastive_loss(s, temperature=temperature)

    W = np.zeros((X.shape[1], Y.shape[1])) if W0 is None else W0
    C, _ = at(W)
    iterates, criteria, deltas = [], [], []
    for k in range(1, max_iter + 1):
        damped = damping < 1 and (k > 1 or W0 is not None)
        M = damping * C + (1 - damping) * RHO * W if damped else C
        W_new = _truncate(M, RANK) / RHO
        deltas.append(np.linalg.norm(W_new - W) / np.linalg.norm(W_new))
        C, loss = at(W_new)
        criteria.append(loss + 0.5 * RHO * np.linalg.norm(W_new) ** 2)
        iterates.append(W_new)
        W = W_new
        if deltas[-1] < tol:
            return iterates, criteria, deltas, "converged", k
        if k > 1 and loss_tol > 0 and criteria[-2] - criteria[-1] < loss_tol * abs(criteria[-1]):
            return iterates, criteria, deltas, "loss plateau", int(np.argmin(criteria)) + 1
    return iterates, criteria, deltas, "max_iter", int(np.argmin(criteria)) + 1


def run(X, Y, temperature, *, operator=None, init=None, resume=None, **options):
    """``solve`` on the dense operator (or ``operator``), "dot" and "sqrt" unless told; the
    result and a copy of the state after every step."""
    options = FixedPointOptions(**{"rank": RANK, "rho": RHO, "factorization": "sqrt", "similarity": "dot",
                                   "damping": 1.0, "tol": 0.0, "loss_tol": 0.0, **options})
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
    iterates, criteria, deltas, reason, best = reference(X, Y, 0.5, damping=damping, max_iter=5)
    assert result.stop_reason == reason == "max_iter" and result.n_iter == 5 and not result.converged
    assert [s.iteration for s in states] == [1, 2, 3, 4, 5]
    for state, W in zip(states, iterates):
        assert _close(state.W, W)
        assert _close(state.F1.T @ state.F2, W)  # the "sqrt" factors of W
    np.testing.assert_allclose([h["objective"] for h in result.history], criteria, rtol=1e-10)
    np.testing.assert_allclose([h["delta_w"] for h in result.history], deltas, rtol=1e-8)
    assert result.initial_loss == pytest.approx(np.log(X.shape[0]) * 0.5, rel=1e-12)  # L(0) = τ log n
    assert result.best_iteration == best and _close(result.W, iterates[best - 1])
    assert result.loss == result.history[best - 1]["loss"]
    # every operator built is released, the last one too; C of the kept step is returned
    assert len(DenseOperator.built) == 6 and all(op.released for op in DenseOperator.built)
    assert result.C is not None and result.C.shape == (6, 5)
    assert set(result.history[0]["phases"]) == {"tiles", "svd"}  # an operator that keeps no times


def test_a_warm_start_continues_with_a_damped_step():
    X, Y = _views()
    first, _ = run(X, Y, 0.5, max_iter=2)
    W0 = (first.F1.T @ first.F2).numpy()
    result, states = run(X, Y, 0.5, damping=0.5, max_iter=3, init=(first.F1, first.F2))
    iterates, *_ = reference(X, Y, 0.5, damping=0.5, max_iter=3, W0=W0)
    assert all(_close(s.W, W) for s, W in zip(states, iterates))


# ------------------------------------------------------------------ stopping
def test_converged_when_the_change_of_w_is_below_tol():
    X, Y = _views()
    iterates, _, deltas, reason, best = reference(X, Y, 0.5, damping=0.5, tol=1e-6, max_iter=200)
    assert reason == "converged" and 2 < best < 200
    assert deltas[-1] < 0.9e-6 and deltas[-2] > 1.1e-6  # away from the threshold
    result, _ = run(X, Y, 0.5, damping=0.5, tol=1e-6, max_iter=200)
    assert result.stop_reason == "converged" and result.converged
    assert result.n_iter == result.best_iteration == best
    assert _close(result.W, iterates[-1])


def test_loss_plateau_when_the_objective_barely_decreases():
    X, Y = _views()
    _, criteria, _, reason, best = reference(X, Y, 0.5, damping=0.5, loss_tol=5e-4, max_iter=50)
    k = len(criteria)
    assert reason == "loss plateau" and 2 < k < 50
    # away from the threshold: the decisive decrease is clearly below it, the one before clearly above
    assert criteria[-2] - criteria[-1] < 0.5 * 5e-4 * abs(criteria[-1])
    assert criteria[-3] - criteria[-2] > 2 * 5e-4 * abs(criteria[-2])
    result, _ = run(X, Y, 0.5, damping=0.5, loss_tol=5e-4, max_iter=50)
    assert result.stop_reason == "loss plateau" and not result.converged
    assert result.n_iter == k and result.best_iteration == best


def test_the_plain_map_oscillates_and_keeps_its_best_iterate():
    # τ = 0.5 undamped: the objective rises after the first step, which is kept
    X, Y = _views()
    iterates, criteria, _, reason, best = reference(X, Y, 0.5, max_iter=5)
    assert reason == "max_iter" and best == 1 and min(criteria[1:]) > criteria[0] + 1e-3
    result, _ = run(X, Y, 0.5, max_iter=5)
    assert result.stop_reason == "max_iter" and result.best_iteration == 1 and _close(result.W, iterates[0])


# ------------------------------------------------------------------ the iterate kept
class ScriptedLoss(DenseOperator):
    """The dense operator reporting a scripted loss: L(0) first, then one value per step."""

    script = []

    def __init__(self, *args):
        super().__init__(*args)
        self.loss = ScriptedLoss.script[len(DenseOperator.built) - 1]


def test_the_lowest_criterion_is_kept_without_convergence():
    X, Y = _views()
    DenseOperator.built, ScriptedLoss.script = [], [10.0, 3.0, 1.0, 2.0, 4.0]
    result, states = run(X, Y, 0.5, operator=lambda F1, F2: ScriptedLoss(X, Y, F1, F2, 0.5),
                         similarity="cosine", max_iter=4)
    # cosine similarity compares iterates by L alone: iteration 2 has the lowest
    assert result.stop_reason == "max_iter" and result.best_iteration == 2 and result.loss == 1.0
    assert torch.equal(result.W, states[1].W) and torch.equal(result.F1, states[1].F1)
    assert [s.best[1] for s in states] == [1, 2, 2, 2]
    assert result.C is not None and torch.equal(result.C, DenseOperator.built[1].C)  # C of the step kept


def test_a_fixed_point_is_kept_even_when_an_earlier_iterate_had_a_lower_criterion():
    X, Y = _views()
    _, _, deltas, _, _ = reference(X, Y, 2.0, max_iter=2)
    assert deltas[1] < 0.4 and deltas[0] > 0.6  # tol = 0.5 stops at step 2
    DenseOperator.built, ScriptedLoss.script = [], [10.0, 1.0, 5.0]
    result, _ = run(X, Y, 2.0, operator=lambda F1, F2: ScriptedLoss(X, Y, F1, F2, 2.0),
                    similarity="cosine", tol=0.5, max_iter=5)
    assert result.stop_reason == "converged" and result.n_iter == result.best_iteration == 2
    assert result.loss == 5.0


# ------------------------------------------------------------------ resuming
def test_resuming_after_step_k_ends_with_the_uninterrupted_result_bit_for_bit():
    X, Y = _views()
    full, states = run(X, Y, 0.5, damping=0.5, max_iter=5)
    resumed, later = run(X, Y, 0.5, damping=0.5, max_iter=5, resume=states[1])
    assert [s.iteration for s in later] == [3, 4, 5]
    for attr in ("F1", "F2", "W", "C"):
        assert torch.equal(getattr(resumed, attr), getattr(full, attr)), attr
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert (resumed.best_iteration, resumed.stop_reason, resumed.initial_loss) == (
        full.best_iteration, full.stop_reason, full.initial_loss)


def test_a_finished_state_is_only_returned():
    X, Y = _views()
    full, states = run(X, Y, 0.5, max_iter=3)
    assert states[-1].finished
    DenseOperator.built = []
    again, later = run(X, Y, 0.5, max_iter=3, resume=states[-1])
    assert DenseOperator.built == [] and later == []  # no operator, no step
    assert torch.equal(again.W, full.W) and again.stop_reason == full.stop_reason and again.C is None
    assert isinstance(states[-1], FixedPointState)
