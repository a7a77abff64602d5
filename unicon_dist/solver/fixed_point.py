"""The fixed point of DESIGN §2: closed-form rank-r steps on C(W) = Φ_Xᵀ S(γ)(s(W)) Φ_Y.

:func:`solve` is the iteration written once over operators: ``make_operator(F1, F2)``
returns C at the encoders F1, F2 (``F1 = None``: at s = 0) as an object with ``loss``
(L at those encoders), ``shape``, ``materialize()``, ``matmul``, ``rmatmul`` and
``release()`` (:class:`unicon_dist.math.operators.LinearOperator` plus the loss), and
optionally ``phase_seconds()`` and ``statistics``.  Where the rows live, how the passes
are cut and where they run is the operator factory's business; a dense C(W) of small
arrays drives the same loop (``tests/test_fixed_point.py``).

:func:`step` is one closed-form step, damped as the options say; :func:`solve_estimator`
binds the iteration to a :class:`~unicon_dist.UniCon`: its options, its checkpoint, and
the fitted attributes it ends with.

References
----------
Sui, Wang & Do, "UniCon: Unified Framework for Efficient Contrastive Alignment via
Kernels", ICLR 2026 (the map W ← [C(W)]_r/ρ).  Jain, Meka & Dhillon, "Guaranteed rank
minimization via singular value projection", NeurIPS 2010 (W ← T(W) as a projected
gradient step of length 1/ρ; damping η shortens it to η/ρ).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch

from ..math.closed_form import closed_form_step, damped_target, fixed_point_residual, map_residual, spectral_gap
from ..math.linalg import randomized_svd
from .anderson import make_policy
from .diagnostics import solve_diagnostics
from .progress import FIT_LOGGER
from .verify import verify_operator

__all__ = ["EXACT_SVD_MAX", "FixedPointOptions", "resolve_tol", "FixedPointState", "FixedPointResult", "svd_plan", "step", "ridged",
           "solve", "prepare_estimator", "solve_estimator"]

logger = logging.getLogger(FIT_LOGGER)

# svd="auto" uses LAPACK on the explicit C up to this many features on the smaller side
EXACT_SVD_MAX = 1024


@dataclasses.dataclass(frozen=True)
class FixedPointOptions:
    """What the iteration needs of the estimator's options (see :class:`~unicon_dist.UniCon`).

    ``svd_solver`` ("exact" or "randomized") and ``matrix_free`` (the randomized SVD runs
    on the operator's products rather than on an explicit C) are those :func:`svd_plan`
    chose; the rest are the :class:`~unicon_dist.UniCon` parameters of the same names.
    """

    rank: int
    rho: float = 1.0
    ridge: float = 0.0
    factorization: str = "sqrt"
    similarity: str = "cosine"
    damping: float = 0.5
    max_iter: int = 30
    tol: float = 1e-5
    loss_tol: float = 0.0
    solver: str = "anderson"
    svd_solver: str = "exact"
    matrix_free: bool = False
    svd_oversampling: int = 10
    svd_power_iter: int = 2
    seed: int = 0
    verify: object = None
    verbose: bool = False

    @classmethod
    def from_estimator(cls, model) -> "FixedPointOptions":
        """The options of a :class:`~unicon_dist.UniCon` whose sizes are set (``svd_solver_``)."""
        return cls(
            rank=int(model.rank), rho=model.rho, ridge=model.ridge, factorization=model.factorization,
            similarity=str(model.similarity), damping=model.damping, max_iter=int(model.max_iter), tol=resolve_tol(model.tol, model.dtype),
            solver=model.solver,
            loss_tol=model.loss_tol, svd_solver=model.svd_solver_, matrix_free=model._matrix_free,
            svd_oversampling=int(model.svd_oversampling), svd_power_iter=int(model.svd_power_iter), seed=model.seed,
            verify=model.verify, verbose=bool(model.verbose),
        )


@dataclasses.dataclass
class FixedPointState:
    """The iteration after step k: what a checkpoint holds and a resumed solve continues from.

    ``best`` is (key, iteration, F1, F2, W) of the iterate kept so far (key: its residual,
    or its criterion when ``loss_tol`` > 0); ``F1``,
    ``F2``, ``W`` are those of W_{k+1}, the next point to evaluate (of W_k when
    ``finished``); ``solver`` holds ``pending`` (how W_{k+1} was made, its ΔW and the
    step's σ̄) and ``policy`` (the policy's scalars, :meth:`AndersonSteps.state`), and
    ``solver_arrays`` the policy's factor arrays.
    """

    iteration: int
    finished: bool
    F1: torch.Tensor
    F2: torch.Tensor
    W: torch.Tensor
    best: tuple
    history: list
    converged: bool
    stop_reason: str | None
    initial_loss: float
    solver: dict = dataclasses.field(default_factory=dict)
    solver_arrays: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FixedPointResult:
    """The iterate kept, and the record of the solve.

    ``C`` is the matrix the kept step factored (None when it was never formed: a
    matrix-free SVD, or a resumed solve that did not recompute it); ``verification``
    the float64 comparison of the ``verify`` option, or None.
    """

    F1: torch.Tensor
    F2: torch.Tensor
    W: torch.Tensor
    C: torch.Tensor | None
    history: list
    n_iter: int
    best_iteration: int
    converged: bool
    stop_reason: str | None
    initial_loss: float
    loss: float
    verification: dict | None = None


def resolve_tol(tol, dtype) -> float:
    """``tol``, or the default of the tile precision: 1e-5 in float32, 1e-7 in float64.

    The residual of a point is computed from C(W), whose float32 tiles carry relative
    round-off of a few 1e-7 summed over n rows; 1e-5 sits well above that floor
    (benchmarks/bench_convergence.py reaches it on every data set it runs) and float64
    tiles resolve two more digits.
    """
    if tol is not None:
        return float(tol)
    return 1e-7 if str(dtype).replace("torch.", "") == "float64" else 1e-5


def svd_plan(svd: str, rank: int, oversampling: int, power_iter: int, mx: int, my: int) -> tuple[str, bool]:
    """(solver, matrix_free) of the rank-r step for C of shape (mx, my); ``svd`` as in UniCon."""
    if svd == "exact" or (svd == "auto" and min(mx, my) <= EXACT_SVD_MAX):
        return "exact", False
    # every pass forms the score tiles (width r of the embeddings) and multiplies them by
    # an operand: forming C is one pass with width min(m_x, m_y); the sketch is 2(q + 1)
    # passes with the thin width k = r + p (C·Ω and Cᵀ·Ω).  Measured in
    # benchmarks/bench_kernels.py (streamed part): at r = 64, m = 512 forming C is 2.3× faster.
    r, k = int(rank), int(rank) + int(oversampling)
    sketch_cost = 2 * (int(power_iter) + 1) * (r + k)
    return "randomized", r + min(mx, my) > sketch_cost


def step(C, W_prev, damped: bool, sigma_prev, options: FixedPointOptions, *, scale_known: bool = True,
         factors=None):
    """One closed-form step: the factors of [C]_r/ρ, or of the damped target M (see ``damping``).

    Parameters
    ----------
    C : Tensor of shape (m_x, m_y), or operator
        C at W_prev (an operator when ``options.matrix_free``).
    W_prev : Tensor of shape (m_x, m_y)
        The step's input (float64).
    damped : bool
        Factor M = η C + (1 − η) a W_prev instead of C
        (:func:`unicon_dist.math.closed_form.damped_target`).
    sigma_prev : float or None
        Mean top-r singular value of the previous step's matrix: a matrix-free C's scale.
    options : FixedPointOptions
    scale_known : bool
        False at the first damped step after the s = 0 step, whose C is on another scale:
        a matrix-free C is then sketched once more for its own.
    factors : (F1, F2), optional
        The factors of W_prev when known (its singular values then cost r×r work; without
        them, e.g. at a cold first step, the input has no fixed-point residual).

    Returns
    -------
    F1, F2 : Tensor of shapes (r, m_x), (r, m_y)
    sigma : float
        Mean of the top-r singular values of the matrix factored.
    diagnostics : dict
        "svd_residual", "spectral_gap", "spectral_gap_of", "input_residual".

    Raises
    ------
    ValueError
        The matrix factored is exactly 0 (nothing to learn).
    """
    rank = int(options.rank)
    svals_c = triplets_c = None
    if factors is not None and factors[0] is None:
        factors = None
    if damped and options.factorization == "sqrt" and options.similarity == "dot":
        scale = float(options.rho)  # the proximal gradient step on L + R
    elif damped:
        # W_prev is put on C's scale (top-r mean singular values): with cosine similarity
        # L does not depend on the scale of W, and with the orthonormal factorization
        # neither do the factors, so only directions are averaged.  A matrix-free C's
        # scale comes from the previous step's SVD; it settles at C's own as the
        # iteration converges (it only sets the step length).  The s = 0 step's C is on
        # another scale, so the step after it sketches C once more (``scale_known`` False).
        if not options.matrix_free:
            # one SVD of C serves the scale here and the plain map's residual below
            triplets_c = torch.linalg.svd(ridged(C, options.ridge), full_matrices=False)
            svals_c = triplets_c[1]
            c_scale = float(svals_c[:rank].mean())
        elif scale_known:
            c_scale = sigma_prev
        else:
            # the first damped step of a matrix-free fit: one extra sketch of C for its scale
            # (a plain step here can undo the first step and end the fit at a "plateau")
            c_scale = float(randomized_svd(C, rank, int(options.svd_oversampling), int(options.svd_power_iter),
                                           options.seed)[1].mean())
        w_scale = _mean_singular_value(W_prev, factors, rank)
        damped = w_scale > 0
        scale = c_scale / w_scale if damped else None
    target = damped_target(C, W_prev, float(options.damping), scale) if damped else C
    F1, F2, sig, info = closed_form_step(
        target, rank, options.rho, options.ridge, options.factorization, svd=options.svd_solver,
        oversampling=int(options.svd_oversampling), n_power_iter=int(options.svd_power_iter), seed=options.seed,
        return_singular_values=True, return_info=True,
    )
    sigma = float(sig.mean())
    if sigma == 0.0:
        # The matrix factored is exactly 0: C = 0, and a damped target's W_prev term is
        # either put on C's scale (0) or W_prev is 0 as well.  W = [C]_r/ρ = 0 then, and
        # every row would encode as the zero vector: a fixed point, but of a model that
        # tells no two rows apart.  An error names the cause, where a "converged" fit
        # would hide it (and the cosine scale update below divides by this σ̄).
        raise ValueError(
            "nothing to learn: the matrix this step factors (C = Φ_Xᵀ S Φ_Y) is exactly 0, so the rank-r "
            "map is 0 and every row would encode as the zero vector; C vanishes when no pair has a "
            "negative to contrast (groups or batches with a single group) or when a view's features are "
            "all zero (e.g. a constant view with center=True)"
        )
    diag = {"svd_residual": info["residual"]}
    if not options.matrix_free and (not damped or svals_c is not None):
        diag["spectral_gap"] = info["spectral_gap"] if not damped else spectral_gap(svals_c, rank)
        diag["spectral_gap_of"] = "C"
    elif not options.matrix_free:  # the proximal step ("dot", "sqrt") never needs C's own spectrum
        diag["spectral_gap"] = info["spectral_gap"]
        diag["spectral_gap_of"] = "damped target"
    else:
        diag["spectral_gap"] = info["spectral_gap"]
        diag["spectral_gap_of"] = "damped target (sketch)" if damped else "C (sketch)"
    diag["input_residual"] = diag["map_residual"] = None
    if factors is not None:
        if options.matrix_free:
            # C from the sketch of the matrix factored: M = ηC + βW_prev, so C = (M − βW_prev)/η;
            # accurate to the sketch's residual (recorded with it)
            U, s_k, Vh = info["triplets"]
            C_est = (U * s_k[None, :]) @ Vh
            if damped:
                eta = float(options.damping)
                C_est = (C_est - (1.0 - eta) * scale * W_prev.to(C_est)) / eta
                if options.ridge:  # the sketch is of M + ridge·I: keep C + ridge·I
                    C_est.diagonal().sub_(float(options.ridge) * (1.0 / eta - 1.0))
        else:
            C_est = ridged(C, options.ridge)
        diag["input_residual"] = fixed_point_residual(C_est, *factors, options.rho, options.factorization,
                                                      options.similarity)
        # the plain map's own residual needs C's leading triplets: an explicit C only
        diag["map_residual"] = (None if options.matrix_free else
                                map_residual(C_est, *factors, options.rho, options.factorization, options.similarity,
                                             triplets=triplets_c if damped else info["triplets"]))
    if damped and options.factorization == "sqrt" and options.similarity == "cosine":
        # L is blind to the scale of W here, and C scales as 1/scale(W): the plain map
        # flips the scale (c -> σ̄(C)/ρ ∝ 1/c) every step.  Its fixed-point scale given
        # the new directions is c² = σ̄(C_k)·scale(W_{k−1})/ρ; it is set directly.
        target_scale = math.sqrt(c_scale * w_scale / float(options.rho))
        gain = math.sqrt(target_scale / (sigma / float(options.rho)))
        F1, F2 = F1 * gain, F2 * gain
    return F1, F2, sigma, diag


def ridged(C, ridge: float) -> torch.Tensor:
    """C + ridge·I (leading diagonal) in float64: the matrix an undamped step factors."""
    C = C.to(torch.float64)
    if ridge:
        C = C.clone()
        C.diagonal().add_(float(ridge))
    return C


def solve(make_operator, shape, options: FixedPointOptions, device, *, init=None, resume: FixedPointState = None,
          sigma_start=None, on_step=None, verifier_operator=None, dtype=None) -> FixedPointResult:
    """Find W = [C(W)]_r/ρ from s = 0 or ``init``, certified by its residual (DESIGN §2).

    Every iteration k evaluates one point W_k: the operator at W_k gives L(W_k) and
    C(W_k); the damped step :func:`step` at W_k gives the map's value G(W_k) and the
    certificate of W_k, :func:`unicon_dist.math.closed_form.fixed_point_residual`.  The
    policy of ``options.solver`` (:mod:`unicon_dist.solver.anderson`) then picks W_{k+1}:
    G(W_k) ("plain"), or safeguarded Anderson mixing over G ("anderson").

    Parameters
    ----------
    make_operator : callable
        ``make_operator(F1, F2)``: the operator of C at those encoders (``None, None``: s = 0).
    shape : (int, int)
        (m_x, m_y), the shape of C and W.
    options : FixedPointOptions
    device : torch.device
        Where W and the factors are kept.
    init : (F1, F2), optional
        A warm start: W_1 is given by these encoders instead of the step from s = 0.
    resume : FixedPointState, optional
        Continue after this state's iteration k (a finished state is only returned).  Every
        pass being deterministic, the operator rebuilt at the saved W_{k+1} is the one the
        uninterrupted solve built, bit for bit, and the policy's state is restored with it.
    sigma_start : float, optional
        With ``init``: the mean top-r singular value of the step that gave it (the
        orthonormal damping's scale of a matrix-free C).
    on_step : callable, optional
        ``on_step(state)`` with the :class:`FixedPointState` after every iteration (a checkpoint).
    verifier_operator : callable, optional
        ``verifier_operator(F1, F2, precision)``: operators of the ``verify`` option at the
        kept encoders, in ``dtype`` (the fit's tile precision) and in float64.

    Returns
    -------
    FixedPointResult

    Notes
    -----
    Stopping: "converged" when the residual of W_k is at most ``tol`` (W_k is then the
    encoders kept); "loss plateau", only with ``loss_tol`` > 0, when the criterion (L for
    cosine similarity, L + (ρ/2)‖W‖² for "dot") decreased by less than ``loss_tol``
    times its value; "max_iter".  Without convergence the iterate kept is the one of
    lowest residual (of lowest criterion when ``loss_tol`` > 0), and a warning says its
    residual.
    """
    mx, my = shape
    matrix_free = options.matrix_free
    if resume is not None:
        history, converged, stop_reason = resume.history, resume.converged, resume.stop_reason
        initial_loss, best, start, finished = resume.initial_loss, resume.best, resume.iteration + 1, resume.finished
        F1, F2 = resume.F1, resume.F2
        pending = dict(resume.solver["pending"])
        policy = make_policy(options.solver, (resume.solver["policy"], resume.solver_arrays), device)
    else:
        history, converged, stop_reason, best, start, finished = [], False, None, None, 1, False
        policy = make_policy(options.solver)
        if init is None:
            op = make_operator(None, None)
            initial_loss = op.loss
            C = op if matrix_free else op.materialize()
            zero = torch.zeros((mx, my), dtype=torch.float64, device=device)
            F1, F2, sigma, _ = step(C, zero, False, None, options)
            op.release()
            op = C = None
            pending = {"step": "first step (s = 0)", "delta_w": 1.0, "sigma_prev": sigma}
        else:  # a warm start: the fixed point continues from given encoders
            F1, F2 = (torch.as_tensor(F, device=device).contiguous() for F in init)
            initial_loss = None  # L at the warm start: that of its evaluation
            pending = {"step": "warm start", "delta_w": None, "sigma_prev": sigma_start}
        F1, F2 = F1.to(device).contiguous(), F2.to(device).contiguous()
    best_C = None
    stop = start if finished else int(options.max_iter) + 1
    for it in range(start, stop):
        t0 = time.perf_counter()
        op = make_operator(F1, F2)
        built = _phase_seconds(op)
        if initial_loss is None:
            initial_loss = op.loss
        W = F1.T.to(torch.float64) @ F2.to(torch.float64)
        C = op if matrix_free else op.materialize()
        t_svd = time.perf_counter()
        stats = getattr(op, "statistics", None) or {}
        # the damped map's value at W_k, and the certificate of W_k
        G1, G2, sigma, step_diag = step(C, W, options.damping < 1, pending["sigma_prev"], options,
                                        scale_known=it > 1 or init is not None,
                                        factors=(F1, F2))
        G1, G2 = G1.to(device).contiguous(), G2.to(device).contiguous()
        residual = step_diag["input_residual"]
        t_svd = time.perf_counter() - t_svd
        phases = _phases(built, _phase_seconds(op), built, t_svd, matrix_free)
        loss = op.loss
        objective = loss + 0.5 * options.rho * float(torch.linalg.norm(W) ** 2)
        # with cosine similarity L does not see the scale of W, which R alone sets: iterates
        # are compared by L; with "dot" by the objective L + R
        criterion = loss if options.similarity == "cosine" else objective
        converged = residual is not None and residual <= options.tol
        previous = history[-1]["criterion"] if history else None
        plateau = (not converged and previous is not None and options.loss_tol > 0
                   and previous - criterion < options.loss_tol * abs(criterion))
        stop_reason = ("converged" if converged else "loss plateau" if plateau
                       else "max_iter" if it == int(options.max_iter) else None)
        accepted = True
        if stop_reason is None:
            N1, N2, how, accepted = policy.propose((F1, F2), (G1, G2), residual, criterion, options)
            N1, N2 = N1.to(device).contiguous(), N2.to(device).contiguous()
            W_next = N1.T.to(torch.float64) @ N2.to(torch.float64)
            delta_next = float(torch.linalg.norm(W_next - W) / torch.linalg.norm(W_next).clamp_min(1e-300))
        seconds = time.perf_counter() - t0
        history.append(
            {"iteration": it, "loss": loss, "objective": objective, "criterion": criterion, "residual": residual,
             "delta_w": pending["delta_w"], "step": pending["step"], "accepted": accepted, "seconds": seconds,
             "phases": phases, "sigma_mean": sigma, **step_diag,
             "lse_min": stats.get("lse_min"), "lse_max": stats.get("lse_max"),
             "log_space_batches": stats.get("log_space_batches")}
        )
        if options.verbose:
            logger.info("iteration %d: loss %.6g, residual %.3e (%s), %.2fs (%s)", it, loss, residual, pending["step"],
                        seconds, ", ".join(f"{k} {v:.2f}s" for k, v in phases.items()))
        # the iterate kept is the one closest to the fixed point the fit claims (its
        # certificate), or, where the user asked for a loss-plateau stop, the lowest loss;
        # a converged fit keeps its certified fixed point in either case
        key = criterion if options.loss_tol > 0 else residual
        if best is None or key < best[0] or converged:
            best = (key, it, F1, F2, W)
            best_C = None if matrix_free else C  # what a fast update folds new rows into
        op.release()
        op = C = None
        if stop_reason is None:
            pending = {"step": how, "delta_w": delta_next, "sigma_prev": sigma}
            F1, F2 = N1, N2
        if on_step is not None:
            header, arrays = policy.state()
            on_step(FixedPointState(it, stop_reason is not None, F1, F2, W if stop_reason is not None else W_next,
                                    best, history, converged, stop_reason, initial_loss,
                                    solver={"pending": pending, "policy": header}, solver_arrays=arrays))
        if stop_reason is not None:
            break
    n_iter = len(history)
    _, best_iteration, F1, F2, W = best
    loss = history[best_iteration - 1]["loss"]
    last = history[-1]
    if stop_reason == "loss plateau":
        logger.info("UniCon stopped after %d iterations: the loss decreased by less than loss_tol=%.3g "
                    "(residual %.3g); keeping iteration %d, the lowest %s", n_iter, options.loss_tol,
                    last["residual"], best_iteration, "loss" if options.similarity == "cosine" else "objective")
    elif not converged:
        logger.warning(
            "UniCon did not converge in %d iterations (last residual %.3g > tol %.3g); keeping iteration %d, "
            "the lowest %s (residual %.3g)%s", n_iter, last["residual"], options.tol, best_iteration,
            ("loss" if options.similarity == "cosine" else "objective") if options.loss_tol > 0 else "residual",
            history[best_iteration - 1]["residual"], _no_fixed_point_hint(history, options),
        )
    verification = None
    if options.verify is not None and verifier_operator is not None:
        work = verifier_operator(F1, F2, dtype)
        reference = verifier_operator(F1, F2, torch.float64)
        verification = verify_operator(work, reference, options.verify, rank=int(options.rank), seed=options.seed)
        work.release()
        reference.release()
    return FixedPointResult(F1, F2, W, best_C, history, n_iter, best_iteration, converged, stop_reason,
                            initial_loss, loss, verification)


def _no_fixed_point_hint(history, options) -> str:
    """Why a cosine fit may have no fixed point, when its residuals say so."""
    if options.similarity == "cosine" and options.factorization == "sqrt" and \
            min(h["residual"] for h in history) > math.sqrt(2):
        return ("; every residual is above √2: the tangent part of C points against W, i.e. the loss at this "
                "temperature prefers softer similarities than the data allow, and no scale of W is a fixed "
                "point (a larger temperature has one)")
    return ""


# ------------------------------------------------------------ the estimator's binding
def prepare_estimator(model, loss_fn, dx: int, dy: int, mx: int, my: int) -> None:
    """Set the sizes a fit of ``model`` solves at (inputs dx, dy; features mx, my) and its SVD plan."""
    if model.rank > min(mx, my):
        raise ValueError(f"rank={model.rank} exceeds min(m_x, m_y) = min({mx}, {my}) = {min(mx, my)} features")
    model.svd_solver_, model._matrix_free = svd_plan(model.svd, model.rank, model.svd_oversampling,
                                                     model.svd_power_iter, mx, my)
    model.loss_fn_ = loss_fn
    model.n_features_x_, model.n_features_y_ = mx, my
    model.n_inputs_x_, model.n_inputs_y_ = dx, dy


def solve_estimator(model, make_operator, device, *, init=None, sigma_start=None, checkpoint=None,
                    verifier_operator=None, dtype=None):
    """:func:`solve` with ``model``'s options; its fitted attributes set from the result.

    ``checkpoint`` (a :class:`unicon_dist.io.checkpoints.CheckpointRun`) is written after
    every step and, when it holds a state, resumed from.  Sets ``history_``,
    ``converged_``, ``stop_reason_``, ``tol_``, ``initial_loss_``, ``n_iter_``, ``best_iteration_``,
    ``loss_``, ``C_``, ``F1_``, ``F2_``, ``W_`` and ``diagnostics_``; returns ``model``.
    """
    options = FixedPointOptions.from_estimator(model)
    mx, my = model.n_features_x_, model.n_features_y_
    resume = on_step = None
    if checkpoint is not None:
        if checkpoint.header is not None:
            saved = checkpoint.fit_state(device, svd_solver=model.svd_solver_, n_features=[mx, my],
                                         n_inputs=[model.n_inputs_x_, model.n_inputs_y_], rank=int(model.rank))
            resume = FixedPointState(**saved)

        def on_step(state):
            checkpoint.write(state.iteration, state.F1, state.F2, state.W, state.best, finished=state.finished,
                             converged=state.converged, history=state.history, initial_loss=state.initial_loss,
                             stop_reason=state.stop_reason, svd_solver=model.svd_solver_,
                             n_features=[mx, my], n_inputs=[model.n_inputs_x_, model.n_inputs_y_],
                             maps=(model.map_x_, model.map_y_), solver=(state.solver, state.solver_arrays))

    result = solve(make_operator, (mx, my), options, device, init=init, resume=resume, sigma_start=sigma_start,
                   on_step=on_step, verifier_operator=verifier_operator, dtype=dtype)
    model.history_, model.converged_, model.stop_reason_ = result.history, result.converged, result.stop_reason
    model.tol_ = options.tol
    model.initial_loss_, model.n_iter_, model.best_iteration_ = result.initial_loss, result.n_iter, result.best_iteration
    model.C_ = None if result.C is None else result.C.cpu().numpy()
    model.loss_ = result.loss
    model.F1_ = result.F1.cpu().numpy()
    model.F2_ = result.F2.cpu().numpy()
    model.W_ = result.W.cpu().numpy()
    model.diagnostics_ = solve_diagnostics(model, result.verification)
    return model


def _mean_singular_value(W, factors, rank: int) -> float:
    """Mean of the top-``rank`` singular values of W = F1ᵀF2: from the r×r core R1R2ᵀ of
    the QR factors of F1ᵀ and F2ᵀ when the factors are given, else from W itself."""
    if factors is None:
        return float(torch.linalg.svdvals(W.to(torch.float64))[:rank].mean())
    F1, F2 = (torch.as_tensor(F, dtype=torch.float64) for F in factors)
    R1 = torch.linalg.qr(F1.T, mode="r")[1]
    R2 = torch.linalg.qr(F2.T, mode="r")[1]
    return float(torch.linalg.svdvals(R1 @ R2.T)[:rank].mean())


def _phase_seconds(op) -> dict:
    """The operator's seconds by phase (zeros for an operator that does not time itself)."""
    seconds = getattr(op, "phase_seconds", None)
    return seconds() if seconds is not None else {"product": 0.0, "statistics": 0.0}


def _phases(before: dict, after: dict, built: dict, svd_seconds: float, matrix_free: bool) -> dict:
    """Seconds of one step by phase: reading rows, features and embeddings, similarity
    tiles (the passes without their reads and features), and the SVD (without the
    products a matrix-free SVD makes)."""
    product = after["product"] - before["product"]
    out = {}
    for k in ("read", "features"):
        if k in built:
            out[k] = after.get(k, 0.0) - before.get(k, 0.0) + built[k]
    out["tiles"] = product + built["statistics"] - out.get("read", 0.0) - out.get("features", 0.0)
    out["svd"] = svd_seconds - (product if matrix_free else 0.0)
    return out
