"""Linear operators: what the SVD drivers need from a matrix, and the compositions they use.

A matrix-free C (the streamed Φ_Xᵀ S Φ_Y) and an explicit matrix are used through the
same three members, so :func:`~unicon_dist.math.linalg.randomized_svd` and the
closed-form step run one code path for both.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["LinearOperator", "is_operator", "MatrixOperator", "Shifted", "Mixed"]


@runtime_checkable
class LinearOperator(Protocol):
    """An (m × n) matrix A known through its products.

    ``matmul(Ω)`` returns A Ω for Ω of shape (n, k); ``rmatmul(Ω)`` returns Aᵀ Ω for Ω
    of shape (m, k).  Results may be on any device and dtype; callers convert.
    """

    shape: tuple

    def matmul(self, omega: torch.Tensor) -> torch.Tensor: ...

    def rmatmul(self, omega: torch.Tensor) -> torch.Tensor: ...


def is_operator(A) -> bool:
    """True for a matrix-free operator (not a tensor or array, which also have ``shape``)."""
    return not isinstance(A, (torch.Tensor, np.ndarray)) and isinstance(A, LinearOperator)


class MatrixOperator:
    """Adapter giving an explicit matrix the operator interface (shape, matmul, rmatmul)."""

    def __init__(self, A):
        self.A = torch.as_tensor(np.asarray(A) if not isinstance(A, torch.Tensor) else A).to(torch.float64)
        self.shape = tuple(self.A.shape)

    def matmul(self, omega):
        return self.A @ omega.to(self.A)

    def rmatmul(self, omega):
        return self.A.T @ omega.to(self.A)



class Shifted:
    """C + ridge·I (ones on the leading diagonal) as an operator, for the matrix-free SVD."""

    def __init__(self, op, ridge: float):
        self.op, self.ridge, self.shape = op, ridge, tuple(op.shape)

    def _eye(self, omega, rows):
        out = torch.zeros((rows, omega.shape[1]), dtype=torch.float64)
        k = min(self.shape)
        out[:k] = self.ridge * omega[:k].to(torch.float64).cpu()
        return out

    def matmul(self, omega):
        return self.op.matmul(omega).to(torch.float64).cpu() + self._eye(omega, self.shape[0])

    def rmatmul(self, omega):
        return self.op.rmatmul(omega).to(torch.float64).cpu() + self._eye(omega, self.shape[1])


class Mixed:
    """η·C + β·W_prev as an operator over a matrix-free C (W_prev explicit, m_x × m_y)."""

    def __init__(self, op, W_prev: torch.Tensor, eta: float, beta: float):
        self.op, self.W, self.eta, self.beta, self.shape = op, W_prev.to(torch.float64).cpu(), eta, beta, tuple(op.shape)

    def matmul(self, omega):
        omega64 = omega.to(torch.float64).cpu()
        return self.eta * self.op.matmul(omega).to(torch.float64).cpu() + self.beta * (self.W @ omega64)

    def rmatmul(self, omega):
        omega64 = omega.to(torch.float64).cpu()
        return self.eta * self.op.rmatmul(omega).to(torch.float64).cpu() + self.beta * (self.W.T @ omega64)
