"""How the fixed-point iteration picks its next point: the damped map, or Anderson mixing over it.

Both policies see, after each evaluation k, the point x_k = N(W_k) and the damped map's
output g_k = N(G(W_k)) (:func:`unicon_dist.solver.fixed_point.step`; N puts W on the
unit sphere where L does not see its scale, see :func:`normalize`), the certified
residual of W_k and its criterion, and return the factors of W_{k+1}.

:class:`PlainSteps` is the paper's map (damped): W_{k+1} = G(W_k).

:class:`AndersonSteps` is type-II Anderson mixing (Anderson 1965; Walker & Ni, SIAM J.
Numer. Anal. 2011) on f(x) = g(x) − x with depth m:

    γ = argmin ‖f_k − ΔF γ‖,   x_{k+1} = x_k + β f_k − (ΔX + β ΔF) γ,

projected back onto the rank-r factorization's set (the extrapolated point has rank up
to (m + 1) r).  It is safeguarded in the spirit of Zhang, O'Donoghue & Boyd (SIAM J.
Optim. 2020), with the certificate as the merit: a point whose residual exceeds twice the
lowest accepted one (or, for "dot", whose L + R rose by more than round-off above the
last accepted point's) is rejected, the history restarts from the last accepted point,
and the next point is the damped map from there with the mixing β halved (below 1/4,
the damped map itself) -- so a bad extrapolation costs one evaluation and leaves the
iteration where the damped map would have it.  β (1 at the start) is the one step
length, set by what the residuals measure: halved on every rejection, doubled back
towards 1 after each two accepted steps.

Each policy's state is what a checkpoint needs to continue it bit for bit: small scalars
(:meth:`state`) and factor arrays; every dense matrix is rebuilt from factors by the
same products in an uninterrupted and a resumed solve.
"""

from __future__ import annotations

import math

import torch

from ..math.closed_form import closed_form_step

__all__ = ["ANDERSON_DEPTH", "PlainSteps", "AndersonSteps", "normalize", "make_policy", "POLICIES"]

# history length m: 8 measured as fast as 15 and 30 on Fashion-MNIST halves (n = 10,000,
# r = 64), and better than 5 (benchmarks/bench_convergence.py); its cost is 2(m + 1) factor
# pairs of r × (m_x + m_y) and an m × m least-squares problem per step
ANDERSON_DEPTH = 8
# below this β the damped map itself is the step (a rejected point restarts at β/2)
_MIN_MIXING = 1.0 / 4
# a point is accepted while its residual is below this factor times the lowest accepted
# one: Anderson's residuals are not monotone, and on Fashion-MNIST halves (n = 20,000,
# B = 2048, r = 64) a strict decrease rejected every other extrapolation and stalled at
# 2e-3 after 40 iterations, against 7e-4 with a factor 1.5 (no rejection fired there)
_GROWTH = 2.0
# Tikhonov term of the least-squares normal equations, relative to their trace: keeps γ
# bounded when consecutive residual differences are nearly collinear (Walker & Ni §5)
_LSTSQ_REGULARIZATION = 1e-10
POLICIES = ("anderson", "plain")



def normalize(W: torch.Tensor, options) -> torch.Tensor:
    """N(W): W/‖W‖_F where L is blind to the scale of W ("sqrt" with cosine similarity), else W.

    With the orthonormal factorization W has unit singular values already; with "dot" the
    scale is part of the solution.
    """
    if options.factorization == "sqrt" and options.similarity == "cosine":
        return W / torch.linalg.norm(W)
    return W


def dense(F1: torch.Tensor, F2: torch.Tensor) -> torch.Tensor:
    """W = F1ᵀF2 in float64: the one product every policy rebuilds a point with."""
    return F1.to(torch.float64).T @ F2.to(torch.float64)


def project(Z: torch.Tensor, options, scale: float | None):
    """Factors of the point of the factorization's set nearest Z: the rank-r truncation
    ("sqrt") or its polar factor ("orthonormal"); for "sqrt" with cosine similarity, where
    Z is a direction, scaled to ‖F1ᵀF2‖_F = ``scale`` (the map's estimate of the fixed point's)."""
    # Z has rank ≤ (m + 1) r; a randomized SVD of a dense Z costs no pass over the rows
    F1, F2 = closed_form_step(Z, int(options.rank), 1.0, 0.0, options.factorization, svd=options.svd_solver,
                              oversampling=int(options.svd_oversampling), n_power_iter=int(options.svd_power_iter),
                              seed=options.seed)
    if scale is not None and options.factorization == "sqrt" and options.similarity == "cosine":
        gain = math.sqrt(scale / float(torch.linalg.norm(dense(F1, F2))))
        F1, F2 = F1 * gain, F2 * gain
    return F1.contiguous(), F2.contiguous()


class PlainSteps:
    """The paper's map, damped as ``damping`` says: W_{k+1} = G(W_k), every point accepted."""

    name = "plain"

    def propose(self, point, mapped, residual: float, criterion: float, options):
        """(F1, F2) of the next point, how it was made, and whether ``point`` was accepted."""
        return mapped[0], mapped[1], "damped map" if options.damping < 1 else "plain map", True

    def state(self) -> tuple[dict, dict]:
        return {"policy": self.name}, {}

    @classmethod
    def restore(cls, header: dict, arrays: dict, device) -> "PlainSteps":
        return cls()


class AndersonSteps:
    """Safeguarded type-II Anderson mixing over the damped map (see the module docstring).

    Parameters
    ----------
    depth : int
        Secant pairs kept (m).
    """

    name = "anderson"

    def __init__(self, depth: int = ANDERSON_DEPTH):
        self.depth = int(depth)
        self.mixing = 1.0
        self.accepted_in_row = 0
        self.rejections = 0
        self.accepted = None  # (lowest accepted residual, criterion of the last accepted point)
        self.points = []  # [(X1, X2, G1, G2)]: factors of x_i = N(W_i) and of the map's g_i, oldest first

    # ---------------------------------------------------------------- the step
    def propose(self, point, mapped, residual: float, criterion: float, options):
        """(F1, F2) of the next point, how it was made, and whether ``point`` was accepted.

        ``point`` = (F1, F2) of W_k, ``mapped`` = (G1, G2) of the damped map G(W_k).
        """
        scale = float(torch.linalg.norm(dense(*mapped)))  # the map's scale estimate of the fixed point
        if self.accepted is not None and self._worse(residual, criterion, options):
            # the extrapolation did worse than the point it came from: back to that point,
            # a shorter step, and a history that no longer holds the rejected direction
            self.rejections += 1
            self.mixing = self.mixing / 2
            self.accepted_in_row = 0
            X1, X2, G1, G2 = self.points[-1]
            self.points = self.points[-1:]
            if self.mixing < _MIN_MIXING:
                self.mixing = 1.0  # the damped map from the last accepted point: the safe step
                return G1, G2, "damped map (restart)", False
            x, g = normalize(dense(X1, X2), options), normalize(dense(G1, G2), options)
            F1, F2 = project(x + self.mixing * (g - x), options, float(torch.linalg.norm(dense(G1, G2))))
            return F1, F2, f"damped map, mixing {self.mixing:g} (rejected)", False
        self.accepted = (min(float(residual), self.accepted[0]) if self.accepted else float(residual), float(criterion))
        self.accepted_in_row += 1
        if self.accepted_in_row % 2 == 0 and self.mixing < 1.0:
            self.mixing = min(1.0, 2 * self.mixing)
        self.points = (self.points + [(point[0], point[1], mapped[0], mapped[1])])[-(self.depth + 1):]
        if len(self.points) == 1:
            if self.mixing == 1.0:
                return mapped[0], mapped[1], "damped map", True
            x, g = normalize(dense(*point), options), normalize(dense(*mapped), options)
            F1, F2 = project(x + self.mixing * (g - x), options, scale)
            return F1, F2, f"damped map, mixing {self.mixing:g}", True
        Z, used = self._extrapolate(options)
        F1, F2 = project(Z, options, scale)
        return F1, F2, f"anderson({used})" + (f", mixing {self.mixing:g}" if self.mixing < 1 else ""), True

    def _worse(self, residual: float, criterion: float, options) -> bool:
        best_residual, best_criterion = self.accepted
        if not residual < _GROWTH * best_residual:
            return True
        if options.similarity == "dot":
            # L + R is the merit of the "dot" map (a projected gradient step on it); the
            # slack is tile round-off of the loss (float32: ~1e-7 relative)
            return criterion > best_criterion + 1e-6 * abs(best_criterion)
        return False

    def _extrapolate(self, options):
        """The mixed point x_k + βf_k − (ΔX + βΔF)γ (dense) and the number of pairs it used."""
        xs = [normalize(dense(X1, X2), options) for X1, X2, _, _ in self.points]
        gs = [normalize(dense(G1, G2), options) for _, _, G1, G2 in self.points]
        fs = [g - x for g, x in zip(gs, xs)]
        dF = torch.stack([(fs[i + 1] - fs[i]).reshape(-1) for i in range(len(fs) - 1)], 1)
        dX = torch.stack([(xs[i + 1] - xs[i]).reshape(-1) for i in range(len(xs) - 1)], 1)
        H = dF.T @ dF
        H = H + _LSTSQ_REGULARIZATION * torch.trace(H) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        gamma = torch.linalg.solve(H, dF.T @ fs[-1].reshape(-1))
        b = self.mixing
        Z = (xs[-1] + b * fs[-1]).reshape(-1) - (dX + b * dF) @ gamma
        return Z.reshape(xs[-1].shape), dF.shape[1]

    # ----------------------------------------------------------- checkpoints
    def state(self) -> tuple[dict, dict]:
        """(header, arrays): the scalars as JSON and the history's factors."""
        header = {"policy": self.name, "depth": self.depth, "mixing": self.mixing,
                  "accepted_in_row": self.accepted_in_row, "rejections": self.rejections,
                  "accepted": None if self.accepted is None else list(self.accepted), "n_points": len(self.points)}
        arrays = {}
        for i, factors in enumerate(self.points):
            for name, A in zip(("X1", "X2", "G1", "G2"), factors):
                arrays[f"{name}_{i}"] = A.cpu().numpy()
        return header, arrays

    @classmethod
    def restore(cls, header: dict, arrays: dict, device) -> "AndersonSteps":
        self = cls(int(header["depth"]))
        self.mixing, self.accepted_in_row = float(header["mixing"]), int(header["accepted_in_row"])
        self.rejections = int(header["rejections"])
        self.accepted = None if header["accepted"] is None else tuple(float(v) for v in header["accepted"])
        self.points = [tuple(torch.as_tensor(arrays[f"{name}_{i}"], device=device).contiguous()
                             for name in ("X1", "X2", "G1", "G2")) for i in range(int(header["n_points"]))]
        return self


def make_policy(name: str, state=None, device=None):
    """The policy ``name`` ("anderson" or "plain"), fresh or restored from ``state`` = (header, arrays)."""
    cls = {"anderson": AndersonSteps, "plain": PlainSteps}.get(name)
    if cls is None:
        raise ValueError(f"solver must be one of {POLICIES}, got {name!r}")
    if state is None:
        return cls()
    header, arrays = state
    if header.get("policy") != name:
        raise ValueError(f"the saved solver state is {header.get('policy')!r}, not {name!r}")
    return cls.restore(header, arrays, device)
