"""The contrastive loss family of DESIGN §2 as objects carrying (φ, φ', ψ, ψ', ν, ε).

Every loss is

    L(s) = 1/(2n) Σ_i 1/|P(i)| Σ_{k∈P(i)} φ( Σ_{j∉P(i)} ε ψ(s_ij − ν s_ik) + ε ψ((1−ν) s_ik) )
         + the same with rows and columns exchanged,

so a member is fully described by its outer function φ, inner function ψ, their
derivatives, the positive weight ν and the constant pair weight ε.  The functions
act elementwise on torch tensors; this module does no I/O and knows nothing of
tiles or executors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "ContrastiveLoss",
    "InfoNCE",
    "SmoothedTriplet",
    "PairwiseSigmoid",
    "get_loss",
    "LOSSES",
]


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _check_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


@dataclass(frozen=True)
class ContrastiveLoss:
    """Base class of a member of the loss family.

    Subclasses define ``phi``, ``dphi``, ``psi`` and ``dpsi`` (elementwise torch
    functions) and carry ``nu`` (weight of the positive inside ψ) and ``epsilon``
    (constant pair weight ε).  ``exponential`` is True only for ψ(x) = exp(x/τ)
    with φ(x) = τ log x, the member whose weights factorise and which the
    streamed passes evaluate in log space in O(n²) for any positive structure.
    """

    nu: float = 1.0
    epsilon: float = 1.0

    name = "abstract"
    exponential = False

    def __post_init__(self):
        _check_finite("nu", self.nu)
        _check_positive("epsilon", self.epsilon)

    # φ, φ', ψ, ψ' -----------------------------------------------------------
    def phi(self, a: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dphi(self, a: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def psi(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dpsi(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def params(self) -> dict:
        """Constructor arguments, for saving a model as JSON."""
        from dataclasses import asdict

        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class InfoNCE(ContrastiveLoss):
    """CLIP / InfoNCE: ψ(x) = exp(x/τ), φ(x) = τ log x.

    For one-to-one pairs and ν = 1 this is the symmetric CLIP loss scaled by τ:
    τ/(2n) Σ_i [logsumexp_j(s_ij/τ) − s_ii/τ] + the column term.  Its weight matrix is
    S = (2νI − P − P̄)/(2n), P the row softmax and P̄ the column softmax of s/τ.
    """

    temperature: float = 0.07
    name = "clip"
    exponential = True

    def __post_init__(self):
        super().__post_init__()
        _check_positive("temperature", self.temperature)

    def phi(self, a):
        return self.temperature * torch.log(a)

    def dphi(self, a):
        return self.temperature / a

    def psi(self, x):
        return torch.exp(x / self.temperature)

    def dpsi(self, x):
        return torch.exp(x / self.temperature) / self.temperature


@dataclass(frozen=True)
class SmoothedTriplet(ContrastiveLoss):
    """Triplet loss with a quadratically smoothed hinge, φ(x) = x.

    ψ(x) = h(x + margin) with h(u) = 0 for u ≤ 0, u²/(2δ) for 0 < u < δ and
    u − δ/2 for u ≥ δ (δ = ``smoothing``): the hinge [s_ij − s_ik + margin]_+ of
    Schroff et al. (2015) made continuously differentiable (Rennie & Srebro, 2005).
    With ν = 1 the positive's own term ψ(0) is a constant.
    """

    margin: float = 0.2
    smoothing: float = 0.05
    name = "triplet"

    def __post_init__(self):
        super().__post_init__()
        _check_finite("margin", self.margin)
        _check_positive("smoothing", self.smoothing)

    def phi(self, a):
        return a

    def dphi(self, a):
        return torch.ones_like(a)

    def psi(self, x):
        u = x + self.margin
        d = self.smoothing
        return torch.where(u >= d, u - 0.5 * d, u.clamp(min=0.0) ** 2 / (2.0 * d))

    def dpsi(self, x):
        u = x + self.margin
        return (u / self.smoothing).clamp(0.0, 1.0)


@dataclass(frozen=True)
class PairwiseSigmoid(ContrastiveLoss):
    """Pairwise sigmoid (logistic) loss, SigLIP-like: ψ(x) = τ log(1 + exp(x/τ + b)), φ(x) = x.

    Each (anchor, positive, negative) triple contributes independently through a
    logistic function of s_ij − ν s_ik instead of sharing a softmax normaliser, which
    is the property SigLIP relies on.  Unlike SigLIP proper, the positive enters
    through the family's difference s_ij − ν s_ik rather than a separate term.
    ψ'(x) = sigmoid(x/τ + b).
    """

    temperature: float = 0.1
    bias: float = 0.0
    name = "sigmoid"

    def __post_init__(self):
        super().__post_init__()
        _check_positive("temperature", self.temperature)
        _check_finite("bias", self.bias)

    def phi(self, a):
        return a

    def dphi(self, a):
        return torch.ones_like(a)

    def psi(self, x):
        # logaddexp rather than F.softplus: softplus switches to the identity above a
        # threshold, which makes ψ' differ from the derivative of ψ by up to e^-20
        u = x / self.temperature + self.bias
        return self.temperature * torch.logaddexp(u, torch.zeros_like(u))

    def dpsi(self, x):
        return torch.sigmoid(x / self.temperature + self.bias)


LOSSES = {
    "clip": InfoNCE,
    "infonce": InfoNCE,
    "triplet": SmoothedTriplet,
    "sigmoid": PairwiseSigmoid,
}


def get_loss(loss="clip", temperature: float = 0.07, nu: float = 1.0, **options) -> ContrastiveLoss:
    """Resolve a loss name (or pass through a loss object).

    Parameters
    ----------
    loss : {"clip", "infonce", "triplet", "sigmoid"} or ContrastiveLoss
        The family member.  An object is returned unchanged (``temperature`` and
        ``nu`` are then ignored: the object carries its own).
    temperature : float
        τ of "clip" and "sigmoid"; the hinge smoothing width δ of "triplet".
    nu : float
        Weight ν of the positive inside ψ.
    **options
        Extra constructor arguments (``margin``, ``bias``, ``epsilon``).
    """
    if isinstance(loss, ContrastiveLoss):
        return loss
    if not isinstance(loss, str) or loss.lower() not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(LOSSES)} or a ContrastiveLoss")
    cls = LOSSES[loss.lower()]
    if cls is SmoothedTriplet:
        return cls(nu=nu, smoothing=temperature, **options)
    return cls(nu=nu, temperature=temperature, **options)


def loss_from_params(params: dict) -> ContrastiveLoss:
    """Inverse of :meth:`ContrastiveLoss.params` (used when loading a saved model)."""
    params = dict(params)
    name = params.pop("name")
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} in saved parameters")
    return LOSSES[name](**params)
