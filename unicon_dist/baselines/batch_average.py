"""UniCon solved per batch and averaged: the procedure of the authors' reference code, as a baseline.

The UniCon paper's code solves the closed form on one in-memory batch at a time (dense
n×n S(γ) and K^{±1/2} per batch) and combines the batches by averaging their solutions
with weights from validation retrieval.  :class:`BatchAveragedUniCon` is that per-batch
averaging, reconstructed from the paper's description (not from its code): every batch
gets an in-memory :class:`unicon_dist.UniCon` fit, each batch's map W_b = F1_bᵀF2_b is
scored on validation pairs, W̄ = Σ_b w_b W_b, and the encoders are the rank-r truncated
SVD of W̄.

Why this differs from the global solve.  With all n pairs, :class:`unicon_dist.UniCon`
maximises one objective, L(W) summed over every pair (``negatives="full"``) or over the
batches of a block-diagonal split (``negatives=B``): the closed-form step is the SVD of
the *sum* Σ_b Φ_bᵀ S_b Φ_b.  Averaging instead combines the per-batch maximisers,
Σ_b w_b [Φ_bᵀ S_b Φ_b]_r (at per-batch fixed points), and the average of rank-r
truncations is not the truncation of the sum, so the average of per-batch maximisers is
not the maximiser of the summed objective (not even for equal weights and the same
block-diagonal S).  Besides, each batch's S(γ) is taken at its own encoders, and with
the "orthonormal" factorisation every W_b = U_b V_bᵀ has all singular values 1, so the
average discards how strongly each batch supports each direction.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..math.linalg import truncated_svd
from ..math.kernels import Linear, get_kernel
from ..solver.estimator import UniCon
from ._common import (
    BaselineEstimator,
    cap_validation,
    check_int,
    check_rank,
    check_views,
    retrieval_score,
    split_validation,
)

__all__ = ["BatchAveragedUniCon"]

logger = logging.getLogger(__name__)

WEIGHTINGS = ("validation", "uniform")


class BatchAveragedUniCon(BaselineEstimator):
    """UniCon fitted per batch, the batch maps averaged with validation (or uniform) weights.

    Parameters
    ----------
    rank : int
        Embedding dimension r, of every batch fit and of the average.
    batch_size : int
        Most rows per batch.  The training rows are permuted with
        ``np.random.default_rng(seed)`` and cut into ⌈n_train / batch_size⌉ batches of
        near-equal size (sizes differ by at most one; each keeps its rows in their
        original order).
    validation : float, (X_val, Y_val) or None
        A fraction of the rows held out (drawn with ``seed``; those rows are not
        trained on), separate validation pairs, or None (only with
        ``weighting="uniform"``).  Scores use at most 5,000 validation pairs.
    weighting : {"validation", "uniform"}
        w_b ∝ score_b, the batch's validation mean R@1 (x→y and y→x), or w_b = 1/B.
        If every score is 0, the weights fall back to uniform (logged as a warning and
        recorded in ``weighting_``).
    seed : int
        Seeds the validation split and the batch split; also passed as ``seed`` to
        every batch's UniCon.
    **unicon_options
        Any other :class:`unicon_dist.UniCon` argument (``loss``, ``temperature``,
        ``rho``, ``similarity``, ``factorization``, ``max_iter``, ``device``, ...).  Only
        the linear kernel is supported (no ``kernel``/``kernel_x``/``kernel_y`` other than
        "linear", no ``n_landmarks``): the batch maps must live in one shared feature
        space to be averaged.

    Attributes
    ----------
    F1_ : ndarray of shape (rank, d_x)
    F2_ : ndarray of shape (rank, d_y)
        Encoders from W̄: "orthonormal" (the default) F1 = U_rᵀ, F2 = V_rᵀ; "sqrt"
        F1 = Σ_r^{1/2} U_rᵀ, F2 = Σ_r^{1/2} V_rᵀ, as the ``factorization`` option says.
        With a single batch they are that batch's UniCon encoders themselves
        (W̄ = W_1; an SVD of W_1 would return them only up to a rotation within its
        repeated singular values).
    W_ : ndarray of shape (d_x, d_y)
        F1_ᵀ F2_, the bilinear map of the similarity before normalisation.
    W_mean_ : ndarray of shape (d_x, d_y)
        The averaged map W̄ = Σ_b w_b W_b (float64).
    singular_values_ : ndarray of shape (rank,)
        Top-r singular values of W̄.
    scores_ : ndarray of shape (n_batches,) or None
        Validation mean R@1 of each batch's UniCon.
    weights_ : ndarray of shape (n_batches,)
        The weights w_b (summing to 1).
    weighting_ : str
        The weighting applied ("validation", "uniform", or "uniform (all validation
        scores are 0)").
    batch_rows_ : list of ndarray
        Rows of X (indices into the X passed to ``fit``) of each batch.
    validation_rows_ : ndarray or None
        Rows of X held out for validation when ``validation`` is a fraction.
    history_ : list of dict
        Per batch: "batch", "rows", "score" (None without validation), "weight",
        "seconds" (fit and scoring), "n_iter" and "converged" of its UniCon.
    n_batches_ : int
    n_inputs_x_, n_inputs_y_ : int
    fit_seconds_ : float

    References
    ----------
    Sui, Wang & Do, "UniCon: Unified Framework for Efficient Contrastive Alignment via
    Kernels", ICLR 2026 (the per-batch procedure and validation weighting).
    """

    _fitted_attr = "F1_"

    def __init__(self, rank: int = 128, *, batch_size: int = 4096, validation=0.1, weighting: str = "validation",
                 seed: int = 0, **unicon_options):
        self.rank = rank
        self.batch_size = batch_size
        self.validation = validation
        self.weighting = weighting
        self.seed = seed
        self.unicon_options = unicon_options

    # -------------------------------------------------------------- parameters
    def get_params(self, deep: bool = True) -> dict:
        """Constructor arguments, the UniCon options flattened in."""
        return {**super().get_params(deep), **self.unicon_options}

    def set_params(self, **params):
        own = set(self._param_names())
        for k, v in params.items():
            if k in own:
                setattr(self, k, v)
            else:
                self.unicon_options = {**self.unicon_options, k: v}
        return self

    def _validate_params(self) -> dict:
        batch_size = check_int("batch_size", self.batch_size, 2)
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.weighting == "validation" and self.validation is None:
            raise ValueError("weighting='validation' needs validation (a fraction or (X_val, Y_val))")
        seed = check_int("seed", self.seed, 0)
        options = dict(self.unicon_options)
        known = set(UniCon().get_params())
        for k in options:
            if k not in known:
                raise ValueError(f"unknown UniCon option {k!r} for BatchAveragedUniCon")
        for k in ("center", "whiten"):
            if k in options:
                raise ValueError(f"BatchAveragedUniCon does not take {k}=: centring or whitening each batch would "
                                 "put every batch map in its own coordinates; preprocess X and Y once instead")
        # the per-batch closed forms of the paper's procedure, on the features as given
        options.update(center=False, whiten=None)
        for k in ("kernel", "kernel_x", "kernel_y"):
            value = options.get(k)
            if value is None:
                continue
            kernel = get_kernel(value)
            if not isinstance(kernel, Linear):
                raise ValueError(f"BatchAveragedUniCon supports the linear kernel only, got {k}={value!r}: "
                                 "per-batch Nyström maps have different feature spaces and cannot be averaged")
        if options.get("n_landmarks") is not None:
            raise ValueError(f"BatchAveragedUniCon supports the linear kernel only (exact features); "
                             f"got n_landmarks={options['n_landmarks']!r}")
        # the batch fits' own factorization (UniCon's default unless given)
        factorization = options.get("factorization", UniCon().factorization)
        if factorization not in ("orthonormal", "sqrt"):
            raise ValueError(f"factorization must be 'orthonormal' or 'sqrt', got {factorization!r}")
        return {"batch_size": batch_size, "seed": seed, "options": options, "factorization": factorization}

    # ------------------------------------------------------------------ fitting
    def fit(self, X, Y):
        """Fit one UniCon per batch and average the batch maps.

        Parameters
        ----------
        X : array_like or torch.Tensor, shape (n, d_x)
        Y : array_like or torch.Tensor, shape (n, d_y)
            Row i of X and row i of Y are a pair.

        Returns
        -------
        self
        """
        t_start = time.perf_counter()
        p = self._validate_params()
        seed, options = p["seed"], p["options"]
        X, Y = check_views(X, Y)
        dx, dy = X.shape[1], Y.shape[1]
        rank = check_rank(self.rank, dx, dy)
        Xtr, Ytr, Xv, Yv, train_rows, self.validation_rows_ = split_validation(self.validation, X, Y, seed)
        Xv, Yv = cap_validation(Xv, Yv, seed)
        n_train = Xtr.shape[0]
        batches = _split_batches(n_train, p["batch_size"], seed)
        self.batch_rows_ = [b if train_rows is None else train_rows[b] for b in batches]

        W_sum = np.zeros((dx, dy))          # Σ_b W_b
        W_weighted = np.zeros((dx, dy))     # Σ_b score_b W_b
        scores, history, single = [], [], None
        for k, rows in enumerate(batches, start=1):
            t0 = time.perf_counter()
            idx = torch.as_tensor(rows, device=Xtr.device)
            model = UniCon(rank=rank, seed=seed, **options).fit(Xtr[idx], Ytr[idx])
            if model.map_x_ is not None or model.map_y_ is not None:  # guarded by _validate_params
                raise ValueError("BatchAveragedUniCon supports the linear kernel only")
            F1 = np.asarray(model.F1_, dtype=np.float64)
            F2 = np.asarray(model.F2_, dtype=np.float64)
            W_b = F1.T @ F2
            W_sum += W_b
            score = None
            if Xv is not None:
                score = retrieval_score(model.encode_x(Xv), model.encode_y(Yv))
                scores.append(score)
                W_weighted += score * W_b
            if len(batches) == 1:
                single = (F1, F2)
            history.append({"batch": k, "rows": int(len(rows)), "score": score, "weight": None,
                            "seconds": time.perf_counter() - t0, "n_iter": int(model.n_iter_),
                            "converged": bool(model.converged_)})

        B = len(batches)
        self.scores_ = np.asarray(scores, dtype=np.float64) if Xv is not None else None
        total = float(self.scores_.sum()) if self.scores_ is not None else 0.0
        if self.weighting == "validation" and total > 0:
            self.weighting_ = "validation"
            self.weights_ = self.scores_ / total
            W_mean = W_weighted / total
        else:
            if self.weighting == "validation":
                logger.warning("every batch scored 0 validation R@1; averaging the %d batch maps uniformly", B)
                self.weighting_ = "uniform (all validation scores are 0)"
            else:
                self.weighting_ = "uniform"
            self.weights_ = np.full(B, 1.0 / B)
            W_mean = W_sum / B
        for entry, w in zip(history, self.weights_):
            entry["weight"] = float(w)

        U, s, Vh = truncated_svd(torch.from_numpy(W_mean), rank)
        if single is not None:
            F1, F2 = single
        elif p["factorization"] == "sqrt":
            root = torch.sqrt(s)[:, None]
            F1, F2 = (root * U.T).numpy(), (root * Vh).numpy()
        else:
            F1, F2 = U.T.contiguous().numpy(), Vh.contiguous().numpy()
        self.F1_, self.F2_ = F1, F2
        self.W_ = F1.T @ F2
        self.W_mean_ = W_mean
        self.singular_values_ = s.numpy()
        self.history_ = history
        self.n_batches_ = B
        self.n_inputs_x_, self.n_inputs_y_ = int(dx), int(dy)
        self.fit_seconds_ = time.perf_counter() - t_start
        return self

    def _projection(self, which: str):
        return (self.F1_.T, None) if which == "x" else (self.F2_.T, None)


def _split_batches(n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """⌈n / batch_size⌉ near-equal batches of a seeded permutation of range(n), each sorted."""
    n_batches = -(-n // batch_size)
    order = np.random.default_rng(seed).permutation(n)
    batches = [np.sort(b) for b in np.array_split(order, n_batches)]
    if min(len(b) for b in batches) < 2:
        raise ValueError(f"batch_size={batch_size} splits {n} training pairs into batches of fewer than 2 pairs; "
                         "use a larger batch_size")
    return batches
