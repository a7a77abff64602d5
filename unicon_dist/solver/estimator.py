"""The UniCon estimator: the closed-form fixed point of DESIGN §2 on in-memory arrays."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..version import __version__
from ..io import checkpoints as _ckpt
from ..math.closed_form import FACTORIZATIONS, closed_form_step, damped_target, fixed_point_residual, spectral_gap
from .diagnostics import solve_diagnostics
from ..math.kernels import Kernel, Linear, get_kernel, kernel_from_params, median_sample
from ..math.losses import get_loss, loss_from_params
from ..math.nystrom import LANDMARK_METHODS, NystroemMap, uniform_landmarks
from ..math.whitening import FeatureWhitening, Moments
from ..io.artifacts import ArtifactError, atomic_save_npz, load_npz
from ..math.positives import canonical_groups
from .progress import LogProgress
from .planning import (feature_map_bytes, feature_transform_row_bytes, landmark_selection_bytes, parse_bytes,
                       step_bytes)
from ..data.rows import ArrayPairs, StoreRows, embed, features, inverse_norms
from ..data.provenance import check_appended, store_provenance
from .operator import CrossProductOperator, make_batches
from ..math.validation import check_matrix, check_same_rows, resolve_device, resolve_dtype
from .verify import check_verify, verify_operator

__all__ = ["UniCon"]

logger = logging.getLogger(__name__)

SIMILARITIES = ("cosine", "dot")
SVD_SOLVERS = ("auto", "exact", "randomized")
# svd="auto" uses LAPACK on the explicit C up to this many features on the smaller side
_EXACT_SVD_MAX = 1024
_DEFAULT_LANDMARKS = 1000
# rows per block of the moment pass of centring/whitening
_MOMENT_ROWS = 16384
_FORMAT = "unicon_dist.model/1"


class UniCon:
    """Closed-form contrastive alignment of two views (Sui, Wang & Do, ICLR 2026).

    Encoders f(x) = F1 φ_x(x) and g(y) = F2 φ_y(y) in R^r are found by a fixed
    point: with the similarities s of the current encoders, S(γ) = −∂L/∂s is fixed
    and the best rank-r map is W = F1ᵀF2 = [Φ_Xᵀ S Φ_Y]_r / ρ (a truncated SVD); the
    similarities are then recomputed, until the relative change of W is below
    ``tol``.  The first step starts from s = 0.  S(γ) is never formed: Φ_Xᵀ S Φ_Y is
    streamed in tiles (:class:`unicon_dist.CrossProductOperator`).

    The defaults are those measured best on real pairs (``benchmarks/bench_compare.py``,
    RESULTS §7): centred and ridge-whitened views (``whiten=1e-3``; the first step is
    then regularised CCA), τ = 0.1, the "sqrt" factorization and damped steps
    (η = 0.2) that stop at a loss plateau.  The paper's plain map (``damping=1``,
    ``factorization="orthonormal"``, raw features) oscillates on such data.

    Parameters
    ----------
    rank : int
        Embedding dimension r (≤ min of the two feature dimensions).
    kernel : str or Kernel
        Kernel of both views: "linear" (the inputs are the features), "rbf",
        "laplacian", "polynomial", "cosine", "angular", "arccos0", "arccos1", or a
        :class:`unicon_dist.math.kernels.Kernel` object.
    kernel_x, kernel_y : str or Kernel, optional
        Per-view kernels overriding ``kernel``.
    n_landmarks : int, optional
        Nyström landmarks per view.  Default: none for the linear kernel (exact
        features), min(n, 1000) for any other kernel.
    landmarks : {"uniform", "kmeans++", "leverage"}
        How landmarks are drawn (seeded by ``seed``).
    eig_floor : float
        Relative eigenvalue floor of K_LL in the Nyström map.
    center : bool
        Subtract each view's feature mean over the training rows (after the Nyström map,
        if any) before everything else.
    whiten : float or None
        Ridge λ > 0 to whiten each view's features: φ̃ = (φ − μ)(Σ + λ·(tr Σ/m)·I)^{−1/2}
        (see :mod:`unicon_dist.math.whitening`; the first step is then regularised CCA), or
        None.  The mean is that of ``center``: whitening without centring uses the raw
        second moment.
    loss : str or ContrastiveLoss
        "clip" (InfoNCE), "triplet", "sigmoid", or a loss object.
    temperature : float
        τ > 0 (the hinge smoothing width for "triplet").
    nu : float
        Weight ν of the positive inside ψ.
    rho : float
        Weight of the regulariser (ρ/2)‖W‖²_F; W* = [C]_r / ρ.
    negatives : "full" or int
        All n² pairs, or a seeded split into batches of this size (one global SVD of
        the block-diagonal problem).
    batch_split : {"random", "contiguous"}
        How ``negatives=B`` forms its batches: a seeded random permutation of the rows,
        or runs of consecutive rows (for rows stored in random order).  From a store,
        "random" batches make every panel read touch every chunk; "contiguous" ones
        read each row once per pass.
    similarity : {"cosine", "dot"}
        Cosine: embeddings are L2-normalised; each step linearises at the current
        encoders by scaling row i of Φ_X by 1/‖f(x_i)‖ (and Φ_Y likewise).
    factorization : {"sqrt", "orthonormal"}
        How W* is split into F1, F2 (see :func:`unicon_dist.closed_form_step`).  With
        cosine similarity the split changes the similarities; "sqrt" weights each
        direction by √σ and measured better than "orthonormal" (equal weights).
    ridge : float
        Tikhonov term on the leading diagonal of C before the SVD.
    max_iter : int
        Maximum number of closed-form steps.
    tol : float
        Stop when ‖W_k − W_{k−1}‖_F / ‖W_k‖_F < tol (a fixed point: ``converged_``).
    loss_tol : float
        Also stop when the loss (cosine; the objective L + R for "dot") decreased by
        less than ``loss_tol`` times its value in the last step (``stop_reason_`` "loss
        plateau"; 0 never stops there).  With cosine similarity the fixed point of the
        linearised map is not exactly the minimum of L, and the damped iteration
        approaches it slowly after passing the loss minimum.
    damping : float
        η in (0, 1]: each step factors M_k = η C_k + (1 − η) a W_{k−1} instead of C_k.
        With cosine similarity (or the orthonormal factorization) a puts W_{k−1} on the
        scale of C_k's top-r singular values, so that only directions are averaged; with
        "dot" and "sqrt", a = ρ: a projected gradient step of length η/ρ on L + R (see
        :func:`unicon_dist.math.closed_form.damped_target`).  1 is the plain fixed point;
        η < 1 has the same fixed points and stops the 2-cycles the plain map falls into
        at small τ with cosine similarity.
    svd : {"auto", "exact", "randomized"}
        Solver of the rank-r step.  "auto": LAPACK when the smaller feature side has at
        most 1024 features, else the randomized SVD (Halko et al., 2011), run on the
        explicit C when forming it is cheaper than the sketch's passes and
        matrix-free through the streamed C·Ω, Cᵀ·Ω otherwise.
    svd_oversampling, svd_power_iter : int
        Oversampling p and subspace iterations q of the randomized SVD.
    seed : int
        Seed of the negatives batch split.
    device : str
        Torch device of the tile arithmetic ("cpu", "cuda", ...).
    dtype : {"float32", "float64"}
        Precision of the tiles; C and the SVD are always float64.  (Stored inputs may
        be narrower: a :class:`~unicon_dist.PairStore` holds float16 or bfloat16.)
    verify : None, "full" or int
        After the fit, recompute C at the kept encoders in float64 as well as in
        ``dtype`` and compare them (:func:`unicon_dist.solver.verify.verify_operator`): every
        tile ("full", for small n) or a seeded sample of this many tiles.  The result is
        ``diagnostics_["verify"]``.  Costs one statistics pass in each precision plus the
        tiles compared; a fit through a Ray executor verifies on the driver.
    memory_budget : int or str, optional
        Working memory of the whole fit in this process, in bytes or as a size string
        ("64MiB", "2GB"): panels, tiles, per-pair statistics, the step's C and SVD,
        feature maps, whitening, read buffers and the verifier all come out of it
        (:meth:`memory_plan`), and a budget too small is a ValueError before any work,
        naming the smallest that fits.  Under a budget an array fit streams its rows in
        panels as a store fit does.  None: an array fit holds every feature row (tiles
        cache-sized on the CPU, 1 GiB on CUDA); a store fit plans for 2 GiB.
    verbose : bool
        Log one line per iteration, and the progress of long passes, at INFO level
        (logger ``unicon_dist.solver.estimator``).

    Attributes
    ----------
    F1_ : ndarray of shape (rank, m_x)
    F2_ : ndarray of shape (rank, m_y)
    W_ : ndarray of shape (m_x, m_y)
        F1_ᵀ F2_, the bilinear map of the similarity (float64).
    history_ : list of dict
        Per iteration k: "iteration", "loss" (L at W_k), "objective" (L + (ρ/2)‖W_k‖²),
        "delta_w" (‖W_k − W_{k−1}‖/‖W_k‖), "seconds" and "phases" (seconds per pass),
        and the step's numerics: "spectral_gap" (σ_r/σ_{r+1} of C, or of the damped
        target's sketch when C is matrix-free: "spectral_gap_of"), "svd_residual" (the
        randomized range finder's estimate of ‖M − QQᵀM‖_F/‖M‖_F for the matrix M it
        factored; None for LAPACK),
        "input_residual" (the fixed-point residual ‖P_T(ρW − C)‖/‖P_T(C)‖ of the step's
        input W_{k−1} against C(W_{k−1}); None at a cold first step) and "lse_min",
        "lse_max", "log_space_batches" (pass 1's log-sum-exp statistics at W_{k−1}).
    initial_loss_ : float
        L at s = 0, where the iteration starts.
    loss_ : float
        L at the kept encoders.
    n_iter_ : int
    converged_ : bool
    best_iteration_ : int
        The iterate kept: the fixed point when the iteration converged, else the
        iterate with the lowest loss (cosine similarity; L + R for "dot").
    stop_reason_ : {"converged", "loss plateau", "max_iter"}
    n_inputs_x_, n_inputs_y_ : int
        Input dimensions of the two views.
    n_features_x_, n_features_y_ : int
        Feature dimensions m_x, m_y (inputs for the linear kernel, the Nyström map's
        effective rank otherwise).
    map_x_, map_y_ : NystroemMap, FeatureWhitening or None
        The feature maps (None for exact linear features); with ``center`` or
        ``whiten`` a :class:`~unicon_dist.math.whitening.FeatureWhitening` whose ``base`` is
        the Nyström map or None.
    svd_solver_ : str
        "exact" or "randomized", as chosen for the rank-r step.
    diagnostics_ : dict
        The solve's numerics (see :mod:`unicon_dist.solver.diagnostics`): per view the
        Nyström spectrum summary (condition number of K_LL, effective rank, eigenvalues
        floored) and the whitening spectrum; the last step's spectral gap σ_r/σ_{r+1},
        randomized-SVD residual and fixed-point residual; the range of the log-sum-exp
        statistics; every safeguard that fired (also warned, naming it); with
        ``verify``, the float64 comparison.  The per-iteration values are in
        ``history_``.

    References
    ----------
    Sui, Wang & Do, "UniCon: Unified Framework for Efficient Contrastive Alignment
    via Kernels", ICLR 2026.
    """

    def __init__(
        self,
        rank: int = 128,
        *,
        kernel="linear",
        kernel_x=None,
        kernel_y=None,
        n_landmarks=None,
        landmarks: str = "uniform",
        eig_floor: float = 1e-10,
        center: bool = True,
        whiten=1e-3,
        loss="clip",
        temperature: float = 0.1,
        nu: float = 1.0,
        rho: float = 1.0,
        negatives="full",
        batch_split: str = "random",
        similarity: str = "cosine",
        factorization: str = "sqrt",
        ridge: float = 0.0,
        max_iter: int = 30,
        tol: float = 1e-4,
        loss_tol: float = 1e-4,
        damping: float = 0.2,
        svd: str = "auto",
        svd_oversampling: int = 10,
        svd_power_iter: int = 2,
        seed: int = 0,
        device: str = "cpu",
        dtype: str = "float32",
        verify=None,
        memory_budget: int | None = None,
        verbose: bool = False,
    ):
        self.rank = rank
        self.kernel = kernel
        self.kernel_x = kernel_x
        self.kernel_y = kernel_y
        self.n_landmarks = n_landmarks
        self.landmarks = landmarks
        self.eig_floor = eig_floor
        self.center = center
        self.whiten = whiten
        self.loss = loss
        self.temperature = temperature
        self.nu = nu
        self.rho = rho
        self.negatives = negatives
        self.batch_split = batch_split
        self.similarity = similarity
        self.factorization = factorization
        self.ridge = ridge
        self.max_iter = max_iter
        self.tol = tol
        self.loss_tol = loss_tol
        self.damping = damping
        self.svd = svd
        self.svd_oversampling = svd_oversampling
        self.svd_power_iter = svd_power_iter
        self.seed = seed
        self.device = device
        self.dtype = dtype
        self.verify = verify
        self.memory_budget = memory_budget
        self.verbose = verbose

    # ------------------------------------------------------------ parameters
    _PARAMS = (
        "rank", "kernel", "kernel_x", "kernel_y", "n_landmarks", "landmarks", "eig_floor", "center", "whiten", "loss",
        "temperature", "nu", "rho", "negatives", "batch_split", "similarity", "factorization", "ridge", "max_iter",
        "tol", "loss_tol", "damping", "svd", "svd_oversampling", "svd_power_iter", "seed", "device", "dtype",
        "verify", "memory_budget", "verbose",
    )

    def get_params(self, deep: bool = True) -> dict:
        return {k: getattr(self, k) for k in self._PARAMS}

    def set_params(self, **params):
        for k, v in params.items():
            if k not in self._PARAMS:
                raise ValueError(f"unknown parameter {k!r} for UniCon")
            setattr(self, k, v)
        return self

    def __repr__(self):
        defaults = UniCon()
        changed = [f"{k}={getattr(self, k)!r}" for k in self._PARAMS if getattr(self, k) != getattr(defaults, k)]
        return f"UniCon({', '.join(changed)})"

    def validate_params(self):
        """Check every option before any work, and resolve the objects they name.

        Returns
        -------
        (loss, (kernel_x, kernel_y), device, dtype)
            The :class:`~unicon_dist.math.losses.ContrastiveLoss`, the two kernels, and
            the resolved torch device and dtype.

        Raises
        ------
        ValueError
            The first invalid option, named with its value.
        """
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        kernels = tuple(get_kernel(k if k is not None else self.kernel) for k in (self.kernel_x, self.kernel_y))
        if self.n_landmarks is not None and (
            isinstance(self.n_landmarks, bool) or not isinstance(self.n_landmarks, (int, np.integer))
            or self.n_landmarks < 1
        ):
            raise ValueError(f"n_landmarks must be a positive integer or None, got {self.n_landmarks!r}")
        if self.landmarks not in LANDMARK_METHODS:
            raise ValueError(f"landmarks must be one of {LANDMARK_METHODS}, got {self.landmarks!r}")
        if not (isinstance(self.eig_floor, (int, float)) and 0 <= self.eig_floor < 1):
            raise ValueError(f"eig_floor must be in [0, 1), got {self.eig_floor!r}")
        if not isinstance(self.center, (bool, np.bool_)):
            raise ValueError(f"center must be True or False, got {self.center!r}")
        if self.whiten is not None and (
            isinstance(self.whiten, bool) or not isinstance(self.whiten, (int, float))
            or not math.isfinite(self.whiten) or self.whiten <= 0
        ):
            raise ValueError(f"whiten must be None or a ridge > 0 (relative to the mean eigenvalue), got {self.whiten!r}")
        for name in ("svd_oversampling", "svd_power_iter"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        loss_fn = get_loss(self.loss, temperature=self.temperature, nu=self.nu)
        if not (isinstance(self.rho, (int, float)) and math.isfinite(self.rho) and self.rho > 0):
            raise ValueError(f"rho must be a finite number > 0, got {self.rho!r}")
        make_batches(2, self.negatives, split=self.batch_split)  # validates both values
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.factorization not in FACTORIZATIONS:
            raise ValueError(f"factorization must be one of {FACTORIZATIONS}, got {self.factorization!r}")
        check_verify(self.verify)
        if not (isinstance(self.ridge, (int, float)) and math.isfinite(self.ridge) and self.ridge >= 0):
            raise ValueError(f"ridge must be a finite number >= 0, got {self.ridge!r}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, (int, np.integer)) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if not (isinstance(self.tol, (int, float)) and self.tol >= 0):
            raise ValueError(f"tol must be a number >= 0, got {self.tol!r}")
        if not (isinstance(self.loss_tol, (int, float)) and not isinstance(self.loss_tol, bool)
                and math.isfinite(self.loss_tol) and self.loss_tol >= 0):
            raise ValueError(f"loss_tol must be a number >= 0, got {self.loss_tol!r}")
        if isinstance(self.damping, bool) or not (isinstance(self.damping, (int, float)) and 0 < self.damping <= 1):
            raise ValueError(f"damping must be a number in (0, 1], got {self.damping!r}")
        if self.svd not in SVD_SOLVERS:
            raise ValueError(f"svd must be one of {SVD_SOLVERS}, got {self.svd!r}")
        self._budget_bytes()
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype of the tile arithmetic must be float32 or float64, got {self.dtype!r}")
        return loss_fn, kernels, device, dtype

    def _budget_bytes(self) -> int | None:
        """``memory_budget`` in bytes (None when no budget is set)."""
        if self.memory_budget is None:
            return None
        try:
            return parse_bytes(self.memory_budget)
        except ValueError as exc:
            raise ValueError(f"memory_budget {exc}") from None

    # -------------------------------------------------------------- fitting
    def fit(self, X, Y=None, groups=None, *, executor=None, checkpoint=None, resume=False):
        """Fit the encoders on paired views, in memory or streamed from a pair store.

        Parameters
        ----------
        X : array_like of shape (n, d_x), or PairStore, str or Path
            The first view; or a :class:`unicon_dist.PairStore` (or its path) holding
            both views, whose rows are then streamed through the passes in panels that
            fit ``memory_budget`` (see :class:`unicon_dist.LocalExecutor`).
        Y : array_like, shape (n, d_y)
            The second view; row i of X and row i of Y are a pair.  Omitted for a store.
        groups : array_like of int, shape (n,), optional
            Many-to-many positives: x_i and y_j are positives iff groups[i] == groups[j].
            For a store, its own groups are used when it has them; pass ``groups=False``
            to ignore them.
        executor : LocalExecutor, optional
            Runs the passes over a store (default: a new :class:`LocalExecutor`).
        checkpoint : str or Path, optional
            A checkpoint file (``.npz``) written atomically after every iteration: the
            iterate, the best iterate so far, the history and the feature maps (see
            :mod:`unicon_dist.io.checkpoints`).  Without ``resume`` an existing checkpoint
            there is replaced after the first iteration; any other file is refused.
        resume : bool
            Continue from ``checkpoint`` when it exists: the feature maps are restored
            rather than refitted and the iteration goes on after the checkpoint's
            iteration k (a finished fit is only restored).  The checkpoint must come from
            a fit with the same options (``verbose`` and ``verify`` aside) and data; otherwise a
            ValueError names the first field that differs.  When the file does not exist
            the fit starts from scratch (logged at INFO).

        Returns
        -------
        self

        Raises
        ------
        ValueError
            Invalid options (checked before any data is read), and settings that leave
            nothing to contrast, before the first pass: ``groups`` putting every row in
            one group, or every batch of ``negatives`` holding a single group.  During the
            iteration, a step whose matrix C is exactly 0 (e.g. a constant view with
            ``center=True``): the map would be 0, and no fit is returned.

        Notes
        -----
        A fit from a store equals the in-memory fit on the same rows up to float
        round-off.  Nyström landmarks are then drawn with ``landmarks="uniform"`` only
        (k-means++ and leverage sampling need every row in memory).

        Every pass is deterministic, so a fit resumed from a checkpoint on the same
        device and executor ends with the same model, bit for bit, as an uninterrupted
        one (``F1_``, ``F2_``, ``W_``, the losses in ``history_``; the per-iteration
        seconds are those measured when each iteration ran).
        """
        loss_fn, kernels, device, dtype = self.validate_params()
        if resume and checkpoint is None:
            raise ValueError("resume=True needs checkpoint= (the checkpoint file to continue from)")
        store = _as_store(X)
        if store is not None:
            if Y is not None:
                raise ValueError("fit(store) takes both views from the store; do not pass Y")

            def data():
                use_groups = groups is not False and store.has_groups
                return _ckpt.store_fingerprint(store.path, len(store), store.dim_x, store.dim_y, store.dtype, use_groups)

            with self._checkpointing(checkpoint, resume, loss_fn, data, device):
                return self._fit_store(store, groups, executor, loss_fn, kernels, device, dtype)
        if executor is not None:
            raise ValueError("executor= runs passes over a PairStore; pass the store (or its path) as X")
        if Y is None:
            raise ValueError("Y is required when X is an array (or pass a PairStore as X)")
        X = check_matrix(X, "X", device=device)
        Y = check_matrix(Y, "Y", device=device)
        n = check_same_rows(X=X, Y=Y)
        if n < 2:
            raise ValueError(f"need at least 2 pairs to contrast, got {n}")
        _check_negative_pairs(n, groups, self.negatives, self.batch_split, self.seed)
        if self._budget_bytes() is not None:
            # under a budget the rows stream through the panels of a store fit (nothing
            # n-sized but the inputs themselves and the per-pair statistics)
            def bases():
                return [_base_map(self._fit_map(A, k, name)) for A, k, name in ((X, kernels[0], "X"), (Y, kernels[1], "Y"))]

            with self._checkpointing(checkpoint, resume, loss_fn, lambda: _ckpt.array_fingerprint(X, Y, groups), device):
                return self._fit_store(ArrayPairs(X, Y, groups), None, None, loss_fn, kernels, device, dtype,
                                       fit_bases=bases)
        with self._checkpointing(checkpoint, resume, loss_fn, lambda: _ckpt.array_fingerprint(X, Y, groups), device):
            bases = [_base_map(self._fit_map(A, k, name))
                     for A, k, name in ((X, kernels[0], "X"), (Y, kernels[1], "Y"))]
            # the (Nyström) features once: the moments and the passes both use them
            phi_x, phi_y = self._features(X, bases[0], dtype), self._features(Y, bases[1], dtype)
            self.map_x_, self.map_y_ = self._preprocess(bases, lambda rows: (phi_x[rows], phi_y[rows]), n,
                                                        _MOMENT_ROWS, dtype, featurized=True)
            phi_x, phi_y = (m.apply(F) if isinstance(m, FeatureWhitening) else F
                            for m, F in ((self.map_x_, phi_x), (self.map_y_, phi_y)))
            self._start(loss_fn, X.shape[1], Y.shape[1], phi_x.shape[1], phi_y.shape[1])
            self.data_ = {"source": "arrays", "n_rows": int(n), "dim_x": int(X.shape[1]), "dim_y": int(Y.shape[1])}

            def verifier_operator(F1, F2, precision):
                # the verifier's operators: the fit's features, or all of it again in float64
                if precision == dtype:
                    return self._operator(phi_x, phi_y, F1, F2, groups)
                phi = [self._features(A, fmap, precision) for A, fmap in ((X, self.map_x_), (Y, self.map_y_))]
                return self._operator(*phi, F1, F2, groups)

            return self._iterate(lambda F1, F2: self._operator(phi_x, phi_y, F1, F2, groups), device,
                                 verifier_operator=verifier_operator, dtype=dtype)

    def refit(self, store=None, *, mode: str = "exact", warm_start: bool = True, refresh_maps: bool = False,
              executor=None) -> "UniCon":
        """A new model on every row of the store this one was fitted on, after appends.

        The receiver is left unchanged.  The new model keeps this model's Nyström maps
        and, with ``warm_start``, starts the fixed point from this model's encoders
        instead of s = 0 (the exact mode: full passes over all rows).  Its ``lineage_``
        extends this model's: version, parent version, rows covered, new rows, start,
        iterations, seconds.

        Parameters
        ----------
        store : PairStore, str or Path, optional
            Default: the store recorded in ``data_``.  It must be that store grown by
            appends (same creation time and schema, at least as many rows, the covered
            rows unchanged); anything else raises ValueError naming what differs.
        mode : {"exact", "fast"}
            "exact": the fixed point over all rows.  "fast": one step (damped like
            the iteration's, from this model's W) on
            C ≈ (n_old·C_old + n_new·C_new)/n, where C_old is the C this model's step was
            solved from and C_new = Φ_newᵀ S(γ) Φ_new is formed over the new rows only, at
            this model's encoders.  The approximation: the old rows' block keeps its
            weights from the previous encoders, and old and new rows are not negatives of
            each other (S is block-diagonal between the two sets, as with batched
            negatives).  It costs one pass over the new rows instead of fixed-point passes
            over all of them.  Needs a model that kept its C (an explicit-SVD fit) and
            stopped at its fixed point or at a loss plateau.
        warm_start : bool
            Exact mode: start from this model's encoders (default) or from s = 0.
        refresh_maps : bool
            Exact mode: re-estimate the centring and whitening of each view on all rows
            (one extra read) instead of keeping this model's.  The Nyström landmarks are
            kept either way: new landmarks would put the encoders in another feature
            space.  A warm start is carried over exactly: with A, A' the old and new
            whitening matrices, F1' = F1 A A'^{−1} gives the same embedding up to the
            shift of the mean.
        executor : LocalExecutor or RayExecutor, optional

        Returns
        -------
        UniCon
            The new version (save it under a new name; nothing is overwritten).
        """
        self._check_fitted()
        data = getattr(self, "data_", None) or {}
        target = store if store is not None else data.get("store")
        store = _as_store(target) if target is not None else None
        if store is None:
            raise ValueError("refit needs a pair store (this model records none)")
        check_appended(data, store)
        params = self.get_params()
        params["similarity"] = str(params["similarity"])
        params["loss"] = self.loss_fn_
        new = type(self)(**params)
        loss_fn, kernels, device, dtype = new.validate_params()
        new._parent = {"lineage": list(getattr(self, "lineage_", []) or [{"version": 1}]), "n_rows": data["n_rows"],
                       "sigma_mean": (self.history_[-1].get("sigma_mean") if self.history_ else None)}
        if mode == "fast" and refresh_maps:
            raise ValueError("refresh_maps=True needs mode='exact' (the fast update folds rows into C in the "
                             "model's own feature space)")
        if mode == "fast":
            return new._fast_update(self, store, loss_fn, device, dtype)
        if mode != "exact":
            raise ValueError(f"mode must be 'exact' or 'fast', got {mode!r}")
        start = (torch.as_tensor(self.F1_), torch.as_tensor(self.F2_)) if warm_start else None
        if refresh_maps and (self.center or self.whiten is not None):
            return new._fit_store(store, None, executor, loss_fn, kernels, device, dtype,
                                  maps=[_base_map(m) for m in (self.map_x_, self.map_y_)], start=start,
                                  carry_from=(self.map_x_, self.map_y_))
        return new._fit_store(store, None, executor, loss_fn, kernels, device, dtype,
                              maps=(self.map_x_, self.map_y_), start=start)

    def _fast_update(self, parent, store, loss_fn, device, dtype) -> "UniCon":
        """Fold the appended rows into the parent's C at its encoders; one SVD (see refit)."""
        from .executor import LocalExecutor

        if not (parent.converged_ or getattr(parent, "stop_reason_", None) == "loss plateau"):
            raise ValueError("mode='fast' needs a model that stopped at its fixed point or at a loss plateau "
                             f"(this one: {getattr(parent, 'stop_reason_', None) or 'not converged'}; its C does not "
                             "belong to its encoders); use mode='exact', or damping < 1 to reach convergence")
        if getattr(parent, "C_", None) is None:
            raise ValueError("mode='fast' needs the C the model was solved from; this model has none (fitted with "
                             "a matrix-free SVD, resumed, or saved by an older unicon_dist); use mode='exact'")
        t0 = time.perf_counter()
        n_old, n = parent.data_["n_rows"], len(store)
        self.map_x_, self.map_y_ = parent.map_x_, parent.map_y_
        self._start(loss_fn, store.dim_x, store.dim_y, parent.n_features_x_, parent.n_features_y_)
        F1, F2 = torch.as_tensor(parent.F1_, device=device), torch.as_tensor(parent.F2_, device=device)
        C = torch.as_tensor(parent.C_, dtype=torch.float64, device=device) * n_old
        loss_new = float("nan")
        if n > n_old:
            plan = self._plan_passes(LocalExecutor(), store, n - n_old, self.n_features_x_, self.n_features_y_,
                                     dtype, _landmark_counts((self.map_x_, self.map_y_)))
            rows = StoreRows(str(store.path), self.map_x_, self.map_y_, F1, F2, str(self.similarity), dtype,
                             str(device), _store=store)
            op = CrossProductOperator.from_loader(
                _Shifted(rows, n_old), n - n_old, (self.n_features_x_, self.n_features_y_), int(self.rank),
                loss=loss_fn, negatives=self.negatives, batch_split=self.batch_split, seed=self.seed,
                groups=store.read_groups(slice(n_old, n)) if store.has_groups else None,
                norm_bound=(1.0, 1.0) if self.similarity == "cosine" else None, memory_budget=plan.tile_budget,
                panel_rows=plan.panel_rows, device=device, dtype=dtype,
            )
            C += op.materialize() * (n - n_old)
            loss_new = op.loss
        C /= n
        # the same (damped) step the parent's iteration takes, from the parent's W
        self.svd_solver_, self._matrix_free = parent.svd_solver_, False
        F1, F2, _, step_diag = self._step(C, torch.as_tensor(parent.W_, dtype=torch.float64, device=device),
                                          self.damping < 1, None, factors=(parent.F1_, parent.F2_))
        self.F1_, self.F2_ = F1.cpu().numpy(), F2.cpu().numpy()
        self.W_ = self.F1_.T @ self.F2_
        self.C_ = C.cpu().numpy()
        seconds = time.perf_counter() - t0
        # the loss over all rows would need the passes this mode avoids: only the new rows'
        self.history_ = [{"iteration": 1, "loss_new_rows": loss_new, "seconds": seconds, "mode": "fast",
                          **step_diag}]
        self.n_iter_, self.best_iteration_, self.converged_ = 1, 1, False
        self.stop_reason_ = "fast update"
        self.loss_ = self.initial_loss_ = float("nan")
        self.data_ = store_provenance(store, n)
        parent_info = self.__dict__.pop("_parent")
        self.lineage_ = parent_info["lineage"] + [{
            "version": parent_info["lineage"][-1]["version"] + 1, "parent": parent_info["lineage"][-1]["version"],
            "rows": [0, n], "new_rows": [n_old, n], "start": "fast", "iterations": 1, "converged": False,
            "seconds": seconds,
        }]
        self.diagnostics_ = solve_diagnostics(self, None)
        return self

    def _fit_store(self, store, groups, executor, loss_fn, kernels, device, dtype, maps=None, start=None,
                   carry_from=None, fit_bases=None):
        """The store fit.  ``maps``: keep these feature maps (a refit), or with ``carry_from``
        (the parent's maps) re-estimate their centring/whitening on all rows and carry the
        warm start ``start`` over to the new whitening.  ``store`` may be an
        :class:`~unicon_dist.data.rows.ArrayPairs` (a fit from arrays under a memory budget),
        whose base feature maps ``fit_bases()`` fits from all rows in memory."""
        from .executor import LocalExecutor

        arrays = isinstance(store, ArrayPairs)
        # the verifier compares its float64 twin tile by tile, so both follow one plan,
        # sized for float64 panels when there is a verifier
        plan_dtype = dtype if self.verify is None else torch.float64
        n = len(store)
        if n < 2:
            raise ValueError(f"pair store {store.path} holds {n} pairs; need at least 2 to contrast")
        if groups is False:
            groups = None
        elif groups is not None:
            raise ValueError("fit(store) uses the store's own groups; pass groups=False to ignore them")
        elif store.has_groups:
            groups = store.read_groups()
        _check_negative_pairs(n, groups, self.negatives, self.batch_split, self.seed)
        executor = LocalExecutor() if executor is None else executor
        # the driver of a distributed executor (e.g. a CPU-only Ray head) keeps its own
        # state -- feature maps, encoders, W -- on the CPU; ``device`` is where workers compute
        driver = torch.device("cpu") if getattr(executor, "distributed", False) else device

        def read(rows, side):
            x, y, _ = store.read(rows)
            return torch.as_tensor(x if side == "x" else y, device=driver)

        if maps is None:
            # every buffer planned before any work: the maps' sizes are bounded by their landmarks
            bound = [self._map_size(kernel, n, dim) for kernel, dim in zip(kernels, (store.dim_x, store.dim_y))]
            self._plan_passes(executor, store, n, *(dim if L is None else L for L, dim in
                                                    zip(bound, (store.dim_x, store.dim_y))),
                              plan_dtype, bound, landmarks=arrays)
            if fit_bases is not None:
                maps = fit_bases()
            else:
                maps = [
                    self._fit_map_rows(lambda rows, s=side: read(rows, s), n, dim, kernel, side.upper())
                    for side, kernel, dim in (("x", kernels[0], store.dim_x), ("y", kernels[1], store.dim_y))
                ]
            preprocess = True
        else:
            # a refit keeps its parent's maps, whitening included, unless it refreshes them
            preprocess = carry_from is not None
        mx = store.dim_x if maps[0] is None else maps[0].n_features
        my = store.dim_y if maps[1] is None else maps[1].n_features
        sizes = _landmark_counts(maps)
        verify_plan = self.plan_ = self._plan_passes(executor, store, n, mx, my, plan_dtype, sizes,
                                                     landmarks=arrays and preprocess)
        if self.verify is not None and dtype != torch.float64:
            # tiles of as many elements in both precisions: the fit's take a budget
            # scaled by its itemsize (plan_tiles divides the budget by bytes per element)
            self.plan_ = dataclasses.replace(
                verify_plan, tile_budget=verify_plan.tile_budget * (torch.finfo(dtype).bits // 8) // 8)
        if preprocess:
            def read_pair(rows):
                x, y, _ = store.read(rows)
                return torch.as_tensor(x, device=driver), torch.as_tensor(y, device=driver)

            maps = self._preprocess(maps, read_pair, n, self.plan_.panel_rows, dtype)
            if carry_from is not None and start is not None:
                start = tuple(_carry_encoder(F, old, new) for F, old, new in zip(start, carry_from, maps))
        self.map_x_, self.map_y_ = maps
        self.data_ = ({"source": "arrays", "n_rows": int(n), "dim_x": store.dim_x, "dim_y": store.dim_y}
                      if arrays else store_provenance(store, n))
        self._start(loss_fn, store.dim_x, store.dim_y, mx, my)
        if self.verbose:
            logger.info("fit from %s: %d pairs in panels of %d rows (%s)", store.path, n, self.plan_.panel_rows,
                        executor)

        def make_operator(F1, F2):
            # a picklable loader: a Ray worker reopens the store from its path
            loader = StoreRows(str(store.path), self.map_x_, self.map_y_, F1, F2, str(self.similarity), dtype,
                               str(device), _store=store)
            return executor.cross_product_operator(
                loader, n, (mx, my), 1 if F1 is None else int(self.rank), plan=self.plan_,
                loss=self.loss_fn_, negatives=self.negatives, batch_split=self.batch_split, groups=groups,
                seed=self.seed,
                constant=F1 is None, norm_bound=(1.0, 1.0) if self.similarity == "cosine" else None,
                device=device, dtype=dtype, progress=LogProgress(logger, rows=n) if self.verbose else None,
            )

        def verifier_operator(F1, F2, precision):
            # on the driver, panel by panel, whatever executes the fit's passes
            loader = StoreRows(str(store.path), self.map_x_, self.map_y_, F1, F2, str(self.similarity), precision,
                               str(device), _store=store)
            return LocalExecutor().cross_product_operator(
                loader, n, (mx, my), int(self.rank), plan=verify_plan if precision == torch.float64 else self.plan_,
                loss=self.loss_fn_, negatives=self.negatives,
                batch_split=self.batch_split, groups=groups, seed=self.seed,
                norm_bound=(1.0, 1.0) if self.similarity == "cosine" else None, device=device, dtype=precision,
            )

        return self._iterate(make_operator, driver, init=start, verifier_operator=verifier_operator, dtype=dtype)

    def memory_plan(self, X, Y=None):
        """The panel plan a fit on these data would follow, computed without reading a row.

        Parameters
        ----------
        X, Y
            As for :meth:`fit` (arrays, or a pair store and no Y).

        Returns
        -------
        PanelPlan
            Rows per panel and the bytes planned (``planned_bytes``), with the feature
            maps at their largest (as many features as landmarks).  Without a
            ``memory_budget`` an array fit holds all its rows instead (the plan is then
            that of the 2 GiB default a store fit uses).

        Raises
        ------
        ValueError
            The options are invalid, or the budget cannot hold the fit; the message names
            the smallest budget that can.
        """
        from .executor import LocalExecutor

        _, kernels, device, dtype = self.validate_params()
        store = _as_store(X)
        if store is None:
            if Y is None:
                raise ValueError("Y is required when X is an array (or pass a PairStore as X)")
            X, Y = check_matrix(X, "X", device=device), check_matrix(Y, "Y", device=device)
            check_same_rows(X=X, Y=Y)
            store = ArrayPairs(X, Y)
        n = len(store)
        dims = (store.dim_x, store.dim_y)
        sizes = [self._map_size(kernel, n, dim) for kernel, dim in zip(kernels, dims)]
        mx, my = (dim if L is None else L for L, dim in zip(sizes, dims))
        # with a verifier the passes are planned for its float64 twin (see _fit_store)
        return self._plan_passes(LocalExecutor(), store, n, mx, my, dtype if self.verify is None else torch.float64,
                                 sizes, landmarks=isinstance(store, ArrayPairs))

    def _map_size(self, kernel, n: int, dim: int) -> int | None:
        """Landmarks of the Nyström map of one view (None: the inputs are the features)."""
        if self.n_landmarks is None and isinstance(kernel, Linear):
            return None
        return int(self.n_landmarks) if self.n_landmarks is not None else min(n, _DEFAULT_LANDMARKS)

    def _plan_passes(self, executor, store, n: int, mx: int, my: int, dtype, sizes=(None, None), *,
                     landmarks: bool = False):
        """The :class:`~unicon_dist.PanelPlan` of passes over n rows of ``store``, the whole fit counted.

        Besides the panels, tiles and per-pair statistics (:func:`~unicon_dist.plan_panels`),
        the budget holds the step (C and its SVD, or the randomized SVD's blocks), the
        Nyström maps of ``sizes`` landmarks (None: linear), the centring/whitening moments,
        the store's read buffers and, with ``landmarks`` (a fit from arrays), the landmark
        selection over all rows.  A budget that cannot hold them is a ValueError naming the
        smallest one that can, raised before any row is read.
        """
        matrix_free = self._svd_plan(mx, my)[1]
        extra = step_bytes(mx, my, int(self.rank), matrix_free=matrix_free, oversampling=int(self.svd_oversampling))
        for L, dim, m in zip(sizes, (store.dim_x, store.dim_y), (mx, my)):
            if L is not None:
                extra += feature_map_bytes(L, dim)
                if landmarks:
                    extra += landmark_selection_bytes(n, L, str(self.landmarks))
            if self.center or self.whiten is not None:
                extra += 4 * 8 * m * m  # float64 moments, their eigendecomposition and the whitening matrix
        extra += store.read_buffer_bytes()
        # one view's transform runs at a time, on the rows of the panel being loaded
        per_row = max([feature_transform_row_bytes(L) for L in sizes if L is not None], default=0)
        return executor.plan(
            n, dim_x=store.dim_x, dim_y=store.dim_y, features_x=mx, features_y=my, rank=int(self.rank),
            itemsize=torch.finfo(dtype).bits // 8, store_itemsize=store.itemsize, memory_budget=self._budget_bytes(),
            extra_bytes=extra, row_extra_bytes=per_row, what=f"pairs ({store.path})",
        )

    def _start(self, loss_fn, dx, dy, mx, my):
        if self.rank > min(mx, my):
            raise ValueError(f"rank={self.rank} exceeds min(m_x, m_y) = min({mx}, {my}) = {min(mx, my)} features")
        self.svd_solver_, self._matrix_free = self._svd_plan(mx, my)
        self.loss_fn_ = loss_fn
        self.n_features_x_, self.n_features_y_ = mx, my
        self.n_inputs_x_, self.n_inputs_y_ = dx, dy

    def _iterate(self, make_operator, device, init=None, verifier_operator=None, dtype=None):
        """The fixed point: closed-form steps on the operators ``make_operator(F1, F2)`` gives.

        ``verifier_operator(F1, F2, dtype)`` builds the operators of the ``verify`` option
        (``dtype``: the fit's tile precision).

        Under ``fit(checkpoint=...)`` the state is written after every step.  Resuming
        after step k rebuilds the operator of the checkpoint's F1, F2: every pass is
        deterministic, so it is the operator the uninterrupted fit built at the end of
        step k, bit for bit, and the steps that follow are the same too.
        """
        mx, my = self.n_features_x_, self.n_features_y_
        run = self.__dict__.get("_checkpoint_run")
        start, finished, op, F1, F2 = 1, False, None, None, None
        if run is not None and run.header is not None:
            k, finished, F1, F2, W_prev, best = self._restore_fit_state(run, device)
            start, delta = k + 1, self.history_[-1]["delta_w"]
            if not finished:
                op = make_operator(F1, F2)
        else:
            self.history_ = []
            self.converged_ = False
            W_prev = torch.zeros((mx, my), dtype=torch.float64, device=device)
            best = None  # (objective, iteration, F1, F2, W)
            if init is None:
                op = make_operator(None, None)
            else:  # a warm start: the fixed point continues from given encoders
                F1, F2 = (torch.as_tensor(F, device=device).contiguous() for F in init)
                W_prev = (F1.T @ F2).to(torch.float64)
                op = make_operator(F1, F2)
            self.initial_loss_ = op.loss
        best_C = None
        # mean top-r singular value of the last step's SVD (the orthonormal damping's scale)
        sigma_prev = self.history_[-1].get("sigma_mean") if self.history_ else None
        if sigma_prev is None and init is not None:
            sigma_prev = self.__dict__.get("_parent", {}).get("sigma_mean")
        stop = start if finished else int(self.max_iter) + 1
        for it in range(start, stop):
            t0 = time.perf_counter()
            before = op.phase_seconds()
            C = op if self._matrix_free else op.materialize()
            t_svd = time.perf_counter()
            damped = self.damping < 1 and (it > 1 or init is not None)
            stats = getattr(op, "statistics", None) or {}
            F1, F2, sigma_prev, step_diag = self._step(C, W_prev, damped, sigma_prev,
                                                       scale_known=it > 2 or init is not None, factors=(F1, F2))
            # contiguous, like the arrays a resumed fit reads back, so that both multiply
            # the same memory layouts (BLAS results can depend on them)
            F1, F2 = F1.to(device).contiguous(), F2.to(device).contiguous()
            W = F1.T @ F2
            delta = float(torch.linalg.norm(W - W_prev) / torch.linalg.norm(W).clamp_min(1e-300))
            t_svd = time.perf_counter() - t_svd
            after = op.phase_seconds()
            # the next step's statistics give L at W_k (pass 1 only when this is the last step)
            op.release()
            # drop the old operator (and, matrix-free, C, which is that operator) before
            # building the next: its loader holds n-row embeddings, and two alive at once
            # double the working memory
            C = None if self._matrix_free else C
            op = None
            op = make_operator(F1, F2)
            phases = _phases(before, after, op.phase_seconds(), t_svd, self._matrix_free)
            objective = op.loss + 0.5 * self.rho * float(torch.linalg.norm(W) ** 2)
            # with cosine similarity L does not see the scale of W, which R alone sets: iterates
            # are compared by L; with "dot" by the objective L + R
            criterion = op.loss if self.similarity == "cosine" else objective
            seconds = time.perf_counter() - t0
            self.history_.append(
                {"iteration": it, "loss": op.loss, "objective": objective, "delta_w": delta, "seconds": seconds,
                 "phases": phases, "sigma_mean": sigma_prev, **step_diag,
                 "lse_min": stats.get("lse_min"), "lse_max": stats.get("lse_max"),
                 "log_space_batches": stats.get("log_space_batches")}
            )
            if self.verbose:
                logger.info("iteration %d: loss %.6g, delta_w %.3e, %.2fs (%s)", it, op.loss, delta, seconds,
                            ", ".join(f"{k} {v:.2f}s" for k, v in phases.items()))
            W_prev = W
            self.converged_ = delta < self.tol
            previous = self.history_[-2]["criterion"] if len(self.history_) > 1 else None
            self.history_[-1]["criterion"] = criterion
            plateau = (not self.converged_ and previous is not None and self.loss_tol > 0
                       and previous - criterion < self.loss_tol * abs(criterion))
            self.stop_reason_ = ("converged" if self.converged_ else "loss plateau" if plateau
                                 else "max_iter" if it == int(self.max_iter) else None)
            # a converged fit keeps its fixed point (a stationary point of L + R), even when an
            # earlier iterate on the way had a slightly lower objective
            if best is None or criterion < best[0] or self.converged_:
                best = (criterion, it, F1, F2, W)
                best_C = None if self._matrix_free else C  # what a fast update folds new rows into
            if run is not None:
                run.write(self, it, F1, F2, W, best, finished=self.stop_reason_ is not None)
            if self.stop_reason_ is not None:
                break
        if op is not None:
            op.release()
        self.n_iter_ = len(self.history_)
        # The fixed-point map need not contract (small τ with cosine similarity can
        # oscillate), so without convergence the encoders kept are those of the iterate
        # with the lowest L (cosine) or L + R (dot); with convergence, the fixed point.
        _, self.best_iteration_, F1, F2, W = best
        # C of the kept step (None when it was never formed, or after a resumed fit that
        # did not recompute it)
        self.C_ = None if best_C is None else best_C.cpu().numpy()
        self.loss_ = self.history_[self.best_iteration_ - 1]["loss"]
        if self.stop_reason_ == "loss plateau":
            logger.info("UniCon stopped after %d iterations: the loss decreased by less than loss_tol=%.3g "
                        "(delta_w %.3g); keeping iteration %d, the lowest loss", self.n_iter_, self.loss_tol, delta,
                        self.best_iteration_)
        elif not self.converged_:
            logger.warning(
                "UniCon did not converge in %d iterations (last delta_w %.3g > tol %.3g); keeping iteration %d, "
                "the lowest %s", self.n_iter_, delta, self.tol, self.best_iteration_,
                "loss" if self.similarity == "cosine" else "objective",
            )
        parent = self.__dict__.pop("_parent", None)  # set by refit
        self.lineage_ = (parent["lineage"] if parent else []) + [{
            "version": parent["lineage"][-1]["version"] + 1 if parent else 1,
            "parent": parent["lineage"][-1]["version"] if parent else None,
            "rows": [0, int(self.data_["n_rows"])],
            "new_rows": [int(parent["n_rows"]), int(self.data_["n_rows"])] if parent else None,
            "start": "cold" if init is None else "warm",
            "iterations": self.n_iter_,
            "converged": self.converged_,
            "seconds": float(sum(h["seconds"] for h in self.history_)),
        }]
        self.F1_ = F1.cpu().numpy()
        self.F2_ = F2.cpu().numpy()
        self.W_ = W.cpu().numpy()
        verification = None
        if self.verify is not None and verifier_operator is not None:
            work = verifier_operator(F1, F2, dtype)
            reference = verifier_operator(F1, F2, torch.float64)
            verification = verify_operator(work, reference, self.verify, rank=int(self.rank), seed=self.seed)
            work.release()
            reference.release()
        self.diagnostics_ = solve_diagnostics(self, verification)
        return self

    def _step(self, C, W_prev, damped: bool, sigma_prev, scale_known: bool = True, factors=None):
        """One closed-form step: the factors of [C]_r/ρ, or of the damped target M (see ``damping``).

        ``factors``: (F1, F2) of W_prev when known (its singular values then cost r×r work;
        without them, e.g. at a cold first step, the input has no fixed-point residual).
        Returns (F1, F2, mean of the top-r singular values of the matrix factored, the
        step's diagnostics: spectral gap, SVD residual, fixed-point residual of W_prev).
        """
        rank = int(self.rank)
        svals_c = None
        if factors is not None and factors[0] is None:
            factors = None
        if damped and self.factorization == "sqrt" and self.similarity == "dot":
            scale = float(self.rho)  # the proximal gradient step on L + R
        elif damped:
            # W_prev is put on C's scale (top-r mean singular values): with cosine similarity
            # L does not depend on the scale of W, and with the orthonormal factorization
            # neither do the factors, so only directions are averaged.  A matrix-free C's
            # scale comes from the previous step's SVD; it settles at C's own as the
            # iteration converges (it only sets the step length).  The s = 0 step's C is on
            # another scale, so the step after it sketches C once more (``scale_known`` False).
            if not self._matrix_free:
                svals_c = torch.linalg.svdvals(self._ridged(C))
                c_scale = float(svals_c[:rank].mean())
            elif scale_known:
                c_scale = sigma_prev
            else:
                # the first damped step of a matrix-free fit: one extra sketch of C for its scale
                # (a plain step here can undo the first step and end the fit at a "plateau")
                from ..math.linalg import randomized_svd

                c_scale = float(randomized_svd(C, rank, int(self.svd_oversampling), int(self.svd_power_iter),
                                               self.seed)[1].mean())
            w_scale = _mean_singular_value(W_prev, factors, rank)
            damped = w_scale > 0
            scale = c_scale / w_scale if damped else None
        target = damped_target(C, W_prev, float(self.damping), scale) if damped else C
        F1, F2, sig, info = closed_form_step(
            target, rank, self.rho, self.ridge, self.factorization, svd=self.svd_solver_,
            oversampling=int(self.svd_oversampling), n_power_iter=int(self.svd_power_iter), seed=self.seed,
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
        if not self._matrix_free and (not damped or svals_c is not None):
            diag["spectral_gap"] = info["spectral_gap"] if not damped else spectral_gap(svals_c, rank)
            diag["spectral_gap_of"] = "C"
        elif not self._matrix_free:  # the proximal step ("dot", "sqrt") never needs C's own spectrum
            diag["spectral_gap"] = info["spectral_gap"]
            diag["spectral_gap_of"] = "damped target"
        else:
            diag["spectral_gap"] = info["spectral_gap"]
            diag["spectral_gap_of"] = "damped target (sketch)" if damped else "C (sketch)"
        diag["input_residual"] = None
        if factors is not None:
            if self._matrix_free:
                # C from the sketch of the matrix factored: M = ηC + βW_prev, so C = (M − βW_prev)/η;
                # accurate to the sketch's residual (recorded with it)
                U, s_k, Vh = info["triplets"]
                C_est = (U * s_k[None, :]) @ Vh
                if damped:
                    eta = float(self.damping)
                    C_est = (C_est - (1.0 - eta) * scale * W_prev.to(C_est)) / eta
                    if self.ridge:  # the sketch is of M + ridge·I: keep C + ridge·I
                        C_est.diagonal().sub_(float(self.ridge) * (1.0 / eta - 1.0))
            else:
                C_est = self._ridged(C)
            diag["input_residual"] = fixed_point_residual(C_est, *factors, self.rho, self.factorization)
        if damped and self.factorization == "sqrt" and self.similarity == "cosine":
            # L is blind to the scale of W here, and C scales as 1/scale(W): the plain map
            # flips the scale (c -> σ̄(C)/ρ ∝ 1/c) every step.  Its fixed-point scale given
            # the new directions is c² = σ̄(C_k)·scale(W_{k−1})/ρ; it is set directly.
            target_scale = math.sqrt(c_scale * w_scale / float(self.rho))
            gain = math.sqrt(target_scale / (sigma / float(self.rho)))
            F1, F2 = F1 * gain, F2 * gain
        return F1, F2, sigma, diag

    def _ridged(self, C) -> torch.Tensor:
        """C + ridge·I (leading diagonal) in float64: the matrix an undamped step factors."""
        C = C.to(torch.float64)
        if self.ridge:
            C = C.clone()
            C.diagonal().add_(float(self.ridge))
        return C

    # ---------------------------------------------------------- checkpoints
    @contextlib.contextmanager
    def _checkpointing(self, path, resume: bool, loss_fn, data, device):
        """Within this block, :meth:`_iterate` writes ``path`` after every step and, with
        ``resume``, starts from it; ``data()`` gives the data part of the fingerprint."""
        if path is None:
            yield
            return
        run = _CheckpointRun(Path(path), self.checkpoint_fingerprint(loss_fn, data()))
        if run.path.is_dir():
            raise ValueError(f"checkpoint {run.path} is a directory; pass the path of a file (e.g. fit.ckpt.npz)")
        if resume:
            run.resume(device)
        elif run.path.exists():
            try:  # an old checkpoint is replaced; any other file (a saved model, say) is not
                _ckpt.read_checkpoint_header(run.path)
            except ValueError as exc:
                raise ValueError(f"{exc}; refusing to replace it with a checkpoint") from None
        # _iterate and _fit_map* find the run here: _fit_store's signature stays untouched
        self._checkpoint_run = run
        try:
            yield
        finally:
            self.__dict__.pop("_checkpoint_run", None)

    def checkpoint_fingerprint(self, loss_fn, data: dict) -> dict:
        """What a checkpoint must match to be resumed: the options, then the data.

        ``verbose`` and ``verify`` are left out (they change no number).  Scalar options come before the
        loss and kernel objects, so that a changed temperature is reported as such rather
        than as the loss that carries it.
        """
        params = self._params_json(loss_fn)
        del params["verbose"], params["verify"]  # neither changes a number of the fit
        ordered = sorted(params, key=lambda k: isinstance(params[k], dict))
        return {**{k: params[k] for k in ordered}, **data}

    def _restored_map(self, name: str):
        """(True, the checkpoint's map of view ``name``) when resuming, else (False, None)."""
        run = self.__dict__.get("_checkpoint_run")
        if run is None or run.header is None:
            return False, None
        return True, run.maps[name.lower()]

    def _restore_fit_state(self, run: "_CheckpointRun", device):
        """Set ``history_``, ``converged_``, ``initial_loss_`` from the checkpoint and return
        (k, finished, F1_k, F2_k, W_k, best) to continue the iteration with."""
        h, a = run.header, run.arrays
        mx, my, r = self.n_features_x_, self.n_features_y_, int(self.rank)
        expected = {
            "svd_solver": (h.get("svd_solver"), self.svd_solver_),
            "n_features": (h.get("n_features"), [mx, my]),
            "n_inputs": (h.get("n_inputs"), [self.n_inputs_x_, self.n_inputs_y_]),
            "F1 shape": (a["F1"].shape if "F1" in a else None, (r, mx)),
            "F2 shape": (a["F2"].shape if "F2" in a else None, (r, my)),
            "W shape": (a["W"].shape if "W" in a else None, (mx, my)),
        }
        for key, (saved, now) in expected.items():
            if saved != now:
                raise ValueError(f"checkpoint {run.path} does not fit this model: {key} is {saved!r} there, "
                                 f"{now!r} here; delete it to start over")

        def tensor(name):
            return torch.as_tensor(np.ascontiguousarray(a[name]), device=device)

        k = int(h["iteration"])
        F1, F2, W = tensor("F1"), tensor("F2"), tensor("W")
        objective, best_it = float(h["best"]["criterion"]), int(h["best"]["iteration"])
        if best_it == k:
            best = (objective, k, F1, F2, W)
        else:
            best = (objective, best_it, tensor("best_F1"), tensor("best_F2"), tensor("best_W"))
        self.history_ = [dict(entry) for entry in h["history"]]
        self.converged_ = bool(h["converged"])
        self.stop_reason_ = h.get("stop_reason")
        self.initial_loss_ = float(h["initial_loss"])
        return k, bool(h["finished"]), F1, F2, W, best

    def _fit_map(self, A: torch.Tensor, kernel: Kernel, name: str) -> NystroemMap | None:
        """The Nyström map of one view, or None when the inputs are the features."""
        restored, fmap = self._restored_map(name)
        if restored:
            return fmap
        if self.n_landmarks is None and isinstance(kernel, Linear):
            return None
        m = int(self.n_landmarks) if self.n_landmarks is not None else min(A.shape[0], _DEFAULT_LANDMARKS)
        if m > A.shape[0]:
            raise ValueError(f"n_landmarks={m} exceeds the number of pairs n={A.shape[0]}")
        return NystroemMap.fit(A, kernel, m, method=self.landmarks, seed=self.seed, eig_floor=self.eig_floor, name=name)

    def _fit_map_rows(self, read, n: int, dim: int, kernel: Kernel, name: str) -> NystroemMap | None:
        """:meth:`_fit_map` reading only the rows it needs: ``read(rows)`` returns them."""
        restored, fmap = self._restored_map(name)
        if restored:
            return fmap
        if self.n_landmarks is None and isinstance(kernel, Linear):
            return None
        if self.landmarks != "uniform":
            raise ValueError(f"landmarks={self.landmarks!r} needs every row in memory; fit from a store "
                             "supports landmarks='uniform'")
        m = int(self.n_landmarks) if self.n_landmarks is not None else min(n, _DEFAULT_LANDMARKS)
        if m > n:
            raise ValueError(f"n_landmarks={m} exceeds the number of pairs n={n}")
        # the same rows, in the same order, as the in-memory fit samples
        sample = median_sample(n, self.seed)
        kernel = kernel.resolve(read(np.arange(n) if sample is None else sample), seed=self.seed)
        return NystroemMap.from_landmarks(kernel, read(uniform_landmarks(n, m, self.seed)), self.eig_floor, name)

    def _preprocess(self, bases, read_pair, n: int, block: int, dtype, featurized: bool = False):
        """The maps ``bases`` (x, y) wrapped in the centring/whitening stage the options ask for.

        The moments of both views are accumulated (in float64) in one read of the rows, in
        blocks of ``block`` rows in row order (``read_pair(slice) -> (x, y)``: inputs, or
        with ``featurized`` the base features already), of the features in ``dtype``, the
        precision the passes see them in.  Without ``center`` and ``whiten`` the bases are
        returned as they are.
        """
        if not self.center and self.whiten is None:
            return list(bases)
        restored = [self._restored_map(name) for name in ("X", "Y")]
        if restored[0][0]:
            return [fmap for _, fmap in restored]
        moments = [None, None]
        for start in range(0, n, max(1, int(block))):
            blocks = read_pair(slice(start, min(n, start + int(block))))
            for k, (A, base) in enumerate(zip(blocks, bases)):
                F = A if featurized else features(A, base, dtype)
                moments[k] = Moments(F.shape[1]) if moments[k] is None else moments[k]
                moments[k].add(F)
        ridge = None if self.whiten is None else float(self.whiten)
        stages = [FeatureWhitening.from_moments(base, mom, bool(self.center), ridge, name)
                  for base, mom, name in zip(bases, moments, ("X", "Y"))]
        for stage, name in zip(stages, ("X", "Y")):
            if self.verbose and stage.spectrum:
                logger.info("whitening of %s: covariance eigenvalues in [%.3g, %.3g], regularised condition %.3g",
                            name, stage.spectrum["smallest"], stage.spectrum["largest"],
                            stage.spectrum["condition_regularised"])
        return stages

    _features = staticmethod(features)

    def _svd_plan(self, mx: int, my: int) -> tuple[str, bool]:
        """(solver, matrix_free) for the rank-r step."""
        if self.svd == "exact" or (self.svd == "auto" and min(mx, my) <= _EXACT_SVD_MAX):
            return "exact", False
        # every pass forms the score tiles (width r of the embeddings) and multiplies them by
        # an operand: forming C is one pass with width min(m_x, m_y); the sketch is 2(q + 1)
        # passes with the thin width k = r + p (C·Ω and Cᵀ·Ω).  Measured in
        # benchmarks/bench_kernels.py (streamed part): at r = 64, m = 512 forming C is 2.3× faster.
        r, k = int(self.rank), int(self.rank) + int(self.svd_oversampling)
        sketch_cost = 2 * (int(self.svd_power_iter) + 1) * (r + k)
        return "randomized", r + min(mx, my) > sketch_cost

    def _embed(self, phi_x, phi_y, F1, F2):
        """(Φ_X, Φ_Y, z_x, z_y) at the encoders F1, F2 (see :func:`unicon_dist.data.rows.embed`)."""
        return embed(phi_x, phi_y, F1, F2, str(self.similarity))

    def _operator(self, phi_x, phi_y, F1, F2, groups) -> CrossProductOperator:
        """S(γ) at the current encoders over in-memory features; F1 = None means s = 0."""
        return CrossProductOperator(
            *self._embed(phi_x, phi_y, F1, F2), loss=self.loss_fn_, negatives=self.negatives,
            batch_split=self.batch_split, groups=groups,
            seed=self.seed,
            progress=LogProgress(logger, rows=phi_x.shape[0]) if self.verbose else None,
        )

    # ------------------------------------------------------------- encoding
    def _check_fitted(self):
        if not hasattr(self, "F1_"):
            raise RuntimeError("this UniCon model is not fitted yet; call fit() or UniCon.load() first")

    def _encode(self, A, which: str):
        self._check_fitted()
        F, name, n_inputs, fmap = (
            (self.F1_, "X", self.n_inputs_x_, self.map_x_) if which == "x"
            else (self.F2_, "Y", self.n_inputs_y_, self.map_y_)
        )
        was_tensor = isinstance(A, torch.Tensor)
        A = check_matrix(A, name)
        if A.shape[1] != n_inputs:
            raise ValueError(f"{name} has {A.shape[1]} features, the model was fitted on {n_inputs}")
        dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
        Ft = torch.as_tensor(F, device=A.device).to(dtype)
        Z = self._features(A, fmap, dtype) @ Ft.T
        if self.similarity == "cosine":
            Z = Z * inverse_norms(Z)[:, None]
        return Z if was_tensor else Z.cpu().numpy()

    def encode_x(self, X):
        """Embeddings f(x) of the first view, shape (n, rank) (unit rows for cosine)."""
        return self._encode(X, "x")

    def encode_y(self, Y):
        """Embeddings g(y) of the second view, shape (n, rank) (unit rows for cosine)."""
        return self._encode(Y, "y")

    def similarity_matrix(self, X, Y):
        """Alias of :meth:`similarity`."""
        return self.similarity(X, Y)

    # ``similarity`` is both a constructor parameter and a method in DESIGN §5; the
    # parameter lives in the instance dict, so the method is reached through the class.
    def _similarity(self, X, Y):
        zx, zy = self.encode_x(X), self.encode_y(Y)
        return zx @ zy.T

    # -------------------------------------------------------------- storage
    def save(self, path):
        """Write the fitted model to one .npz file (JSON header + arrays), atomically."""
        self._check_fitted()
        maps, map_arrays = self._maps_state()
        arrays = {"F1": self.F1_, "F2": self.F2_, **map_arrays}
        if getattr(self, "C_", None) is not None:
            arrays["C"] = self.C_
        header = {
            "format": _FORMAT,
            "version": __version__,
            "params": self._params_json(self.loss_fn_),
            "n_features_x": self.n_features_x_,
            "n_features_y": self.n_features_y_,
            "n_inputs_x": self.n_inputs_x_,
            "n_inputs_y": self.n_inputs_y_,
            "maps": maps,
            "svd_solver": self.svd_solver_,
            "history": self.history_,
            "n_iter": self.n_iter_,
            "converged": self.converged_,
            "stop_reason": getattr(self, "stop_reason_", None),
            "loss": self.loss_,
            "initial_loss": self.initial_loss_,
            "best_iteration": self.best_iteration_,
            "data": getattr(self, "data_", None),
            "lineage": getattr(self, "lineage_", []),
            "diagnostics": getattr(self, "diagnostics_", None),
        }
        return atomic_save_npz(path, header, arrays)

    def _params_json(self, loss_fn) -> dict:
        """get_params() as JSON: the loss as its parameters, kernel objects as theirs."""
        params = self.get_params()
        params["loss"] = loss_fn.params()
        for key in ("kernel", "kernel_x", "kernel_y"):
            if isinstance(params[key], Kernel):
                params[key] = {"kernel": params[key].params()}
        return params

    def _maps_state(self) -> tuple[dict, dict]:
        """The fitted feature maps as (JSON header part, arrays); inverse of :meth:`_maps_from_state`."""
        maps, arrays = {}, {}
        for side, fmap in (("x", self.map_x_), ("y", self.map_y_)):
            if fmap is None:
                continue
            spec = {}
            if isinstance(fmap, FeatureWhitening):
                stage, stage_arrays = fmap.state()
                spec["whitening"] = stage
                arrays.update({f"whitening_{k}_{side}": v for k, v in stage_arrays.items()})
                fmap = fmap.base
            if fmap is not None:
                spec.update(kernel=fmap.kernel.params(), eig_floor=fmap.eig_floor)
                if fmap.spectrum is not None:
                    spec["spectrum"] = fmap.spectrum
                arrays[f"landmarks_{side}"] = fmap.landmarks.cpu().numpy()
                arrays[f"normalization_{side}"] = fmap.normalization.cpu().numpy()
            maps[side] = spec
        return maps, arrays

    @staticmethod
    def _maps_from_state(maps: dict, arrays: dict, device=None) -> dict:
        """{"x": map or None, "y": map or None} from what :meth:`_maps_state` wrote."""
        out = {}
        for side in ("x", "y"):
            spec = maps.get(side)
            if spec is None:
                out[side] = None
                continue
            base = None if "kernel" not in spec else NystroemMap(
                kernel_from_params(spec["kernel"]),
                torch.as_tensor(arrays[f"landmarks_{side}"], device=device),
                torch.as_tensor(arrays[f"normalization_{side}"], device=device),
                float(spec["eig_floor"]),
                spec.get("spectrum"),
            )
            if "whitening" in spec:
                stage_arrays = {k: arrays[f"whitening_{k}_{side}"] for k in ("mean", "matrix")
                                if f"whitening_{k}_{side}" in arrays}
                base = FeatureWhitening.from_state(base, spec["whitening"], stage_arrays, device)
            out[side] = base
        return out

    @classmethod
    def load(cls, path) -> "UniCon":
        """Read a model written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            No such file.
        ArtifactError
            (a ValueError, :mod:`unicon_dist.io.artifacts`) naming the file: it is damaged
            (empty, zero-filled, truncated, a malformed header, NaN or Inf in an array)
            or not a model (another file, a checkpoint).
        """
        header, arrays = load_npz(path, kind="model", format=_FORMAT, required=("F1", "F2"), keys=(
            "params", "maps", "svd_solver", "n_features_x", "n_features_y", "n_inputs_x", "n_inputs_y",
            "history", "n_iter", "converged", "loss", "initial_loss", "best_iteration"))
        try:
            params = dict(header["params"])
            loss_fn = loss_from_params(params.pop("loss"))
            for key in ("kernel", "kernel_x", "kernel_y"):
                if isinstance(params.get(key), dict):
                    params[key] = kernel_from_params(params[key]["kernel"])
            model = cls(**params, loss=loss_fn)
            maps = cls._maps_from_state(header["maps"], arrays)
            model.map_x_, model.map_y_ = maps["x"], maps["y"]
            model.svd_solver_ = header["svd_solver"]
            model.loss_fn_ = loss_fn
            model.F1_ = arrays["F1"]
            model.F2_ = arrays["F2"]
            model.W_ = model.F1_.T @ model.F2_
            model.n_features_x_ = int(header["n_features_x"])
            model.n_features_y_ = int(header["n_features_y"])
            model.n_inputs_x_ = int(header["n_inputs_x"])
            model.n_inputs_y_ = int(header["n_inputs_y"])
            model.history_ = header["history"]
            model.n_iter_ = int(header["n_iter"])
            model.converged_ = bool(header["converged"])
            model.stop_reason_ = header.get("stop_reason")
            model.loss_ = float(header["loss"])
            model.initial_loss_ = float(header["initial_loss"])
            model.best_iteration_ = int(header["best_iteration"])
            model.data_ = header.get("data")
            model.lineage_ = header.get("lineage", [])
            model.diagnostics_ = header.get("diagnostics")
            model.C_ = arrays.get("C")
            return model
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # every key is there (checked above): a value has the wrong type or shape
            written = header.get("version")
            other = "" if written == __version__ else f" (or written by unicon_dist {written}, this is {__version__})"
            raise ArtifactError(path, f"it is damaged{other}: its header and arrays do not describe a model "
                                f"({type(exc).__name__}: {exc})", kind="model") from exc


class _CheckpointRun:
    """The checkpoint of one fit: its file, the fingerprint it must match, the state resumed from."""

    def __init__(self, path: Path, fingerprint: dict):
        self.path = path
        self.fingerprint = fingerprint
        self.header = self.arrays = self.maps = None  # set by resume() when there is a state

    def resume(self, device) -> None:
        """Read the checkpoint, if there is one, after checking that it belongs to this fit."""
        if not self.path.exists():
            logger.info("no checkpoint at %s; fitting from scratch", self.path)
            return
        header, arrays = _ckpt.load_checkpoint(self.path)
        _ckpt.check_fingerprint(self.path, header, self.fingerprint)
        if header.get("version") != __version__:
            logger.warning("checkpoint %s was written by unicon_dist %s, this is %s; the resumed fit may differ "
                           "in round-off from an uninterrupted one", self.path, header.get("version"), __version__)
        state = "a finished fit" if header["finished"] else f"iteration {header['iteration']}"
        logger.info("resuming from checkpoint %s (%s)", self.path, state)
        self.header, self.arrays = header, arrays
        self.maps = UniCon._maps_from_state(header["maps"], arrays, device)

    def write(self, model: UniCon, iteration: int, F1, F2, W, best, finished: bool) -> None:
        """Write the state after ``iteration`` atomically (the previous checkpoint survives a failure)."""
        maps, arrays = model._maps_state()
        arrays.update(F1=F1.cpu().numpy(), F2=F2.cpu().numpy(), W=W.cpu().numpy())
        objective, best_it = best[0], best[1]
        if best_it != iteration:  # the best iterate is stored once when it is the current one
            arrays.update(best_F1=best[2].cpu().numpy(), best_F2=best[3].cpu().numpy(), best_W=best[4].cpu().numpy())
        header = {
            "version": __version__,
            "fingerprint": _ckpt.normalize(self.fingerprint),
            "iteration": iteration,
            "finished": bool(finished),
            "converged": bool(model.converged_),
            "history": model.history_,
            "initial_loss": model.initial_loss_,
            "best": {"criterion": objective, "iteration": best_it},
            "stop_reason": getattr(model, "stop_reason_", None),
            "svd_solver": model.svd_solver_,
            "n_features": [model.n_features_x_, model.n_features_y_],
            "n_inputs": [model.n_inputs_x_, model.n_inputs_y_],
            "maps": maps,
        }
        _ckpt.write_checkpoint(self.path, header, arrays)


class _SimilarityDescriptor:
    """``model.similarity`` is the constructor string; ``model.similarity(X, Y)`` scores pairs."""

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return _SimilarityValue(obj, obj.__dict__["_similarity_kind"])

    def __set__(self, obj, value):
        obj.__dict__["_similarity_kind"] = value


class _SimilarityValue(str):
    """The similarity name, callable as the similarity matrix of two views."""

    def __new__(cls, model, kind):
        self = super().__new__(cls, kind)
        self._model = model
        return self

    def __call__(self, X, Y):
        """Similarity matrix of the encoded views, shape (n_x, n_y)."""
        return self._model._similarity(X, Y)


UniCon.similarity = _SimilarityDescriptor()


class _Shifted:
    """A row loader over rows ``offset`` onwards (the rows appended since a fit)."""

    def __init__(self, loader, offset: int):
        self.loader, self.offset = loader, offset

    def __call__(self, rows):
        if isinstance(rows, slice):
            return self.loader(slice(rows.start + self.offset, rows.stop + self.offset))
        return self.loader(np.asarray(rows) + self.offset)


def _check_negative_pairs(n: int, groups, negatives, batch_split: str, seed: int) -> None:
    """Raise ValueError when ``groups`` leave the loss no negative pair to contrast.

    Parameters
    ----------
    n : int
        Number of pairs.
    groups : array_like of int, shape (n,), or None
        Group labels (None: one-to-one pairs).
    negatives, batch_split, seed
        As in :class:`UniCon`; negatives are drawn within the batches of
        :func:`unicon_dist.solver.operator.make_batches` only.

    Raises
    ------
    ValueError
        If every row is in one group, or every batch of ``negatives`` holds a single
        group: each pair is then a positive of every other it meets, C is 0 up to
        round-off, and the fixed point would factor that round-off.

    Notes
    -----
    Checked before the first pass because the passes cannot tell an exact 0 from the
    round-off they produce (1e-14 in float64, 1e-8 in float32).  One-to-one pairs need no
    check: ``make_batches`` refuses batches of one row, and any two rows are negatives.
    """
    labels = canonical_groups(groups, n)
    if labels is None:
        return
    if labels.max() == 0:
        raise ValueError(f"groups put all {n} pairs in one group: every pair is a positive of every other, so "
                         "there is no negative pair to contrast; give the rows at least two groups or fit "
                         "without groups")
    batches = make_batches(n, negatives, seed, batch_split)
    if batches is None:
        return
    g = labels[np.concatenate(batches)]
    starts = np.cumsum([0] + [len(b) for b in batches[:-1]])
    if np.array_equal(np.minimum.reduceat(g, starts), np.maximum.reduceat(g, starts)):
        remedy = "larger batches, batch_split='random'" if batch_split == "contiguous" else "larger batches"
        raise ValueError(f"with negatives={negatives} (batch_split={batch_split!r}) every batch holds a single "
                         "group: within each batch every pair is a positive of every other, so there is no "
                         f"negative pair to contrast; use {remedy} or negatives='full'")


def _mean_singular_value(W, factors, rank: int) -> float:
    """Mean of the top-``rank`` singular values of W = F1ᵀF2: from the r×r core R1R2ᵀ of
    the QR factors of F1ᵀ and F2ᵀ when the factors are given, else from W itself."""
    if factors is None:
        return float(torch.linalg.svdvals(W.to(torch.float64))[:rank].mean())
    F1, F2 = (torch.as_tensor(F, dtype=torch.float64) for F in factors)
    R1 = torch.linalg.qr(F1.T, mode="r")[1]
    R2 = torch.linalg.qr(F2.T, mode="r")[1]
    return float(torch.linalg.svdvals(R1 @ R2.T)[:rank].mean())


def _landmark_counts(maps) -> list:
    """Landmarks of each feature map (None where the inputs are the features)."""
    return [None if _base_map(m) is None else int(_base_map(m).landmarks.shape[0]) for m in maps]


def _base_map(fmap):
    """The Nyström map (or None) under a centring/whitening stage."""
    return fmap.base if isinstance(fmap, FeatureWhitening) else fmap


def _carry_encoder(F, old, new):
    """F' with F'·Ã'(φ) = F·Ã(φ) up to the mean shift: F' = F A A'^{−1} (A, A' symmetric)."""
    F = torch.as_tensor(F, dtype=torch.float64)
    A_old = getattr(old, "matrix", None)
    A_new = getattr(new, "matrix", None)
    G = F if A_old is None else F @ A_old.to(device=F.device)
    if A_new is not None:
        G = torch.linalg.solve(A_new.to(device=F.device), G.T).T
    return G


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


def _as_store(X):
    """X as a PairStore when it is one or a path to one; None for arrays."""
    import os

    if isinstance(X, (str, os.PathLike)):
        from ..data.store import PairStore

        return PairStore.open(X)
    if hasattr(X, "read") and hasattr(X, "iter_blocks") and hasattr(X, "dim_x"):
        return X
    return None
