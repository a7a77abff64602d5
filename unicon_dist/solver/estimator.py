"""The UniCon estimator: closed-form contrastive alignment (DESIGN §2) behind a scikit-learn API.

The estimator holds the options, validates them once per fit and keeps the fitted state;
the work is elsewhere in this folder: the fit paths -- in memory, under a budget, from a
store -- (:mod:`.fit_paths`), the fixed point (:mod:`.fixed_point`), the feature maps
(:mod:`.feature_maps`), re-solving after appends (:mod:`.refit`); the model file and
checkpoints are :mod:`unicon_dist.io`'s (:mod:`~unicon_dist.io.model_files`,
:mod:`~unicon_dist.io.checkpoints`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data.rows import features, inverse_norms
from ..io.model_files import FITTED, load_model, params_json, save_model
from ..math.closed_form import FACTORIZATIONS
from ..math.kernels import get_kernel
from ..math.losses import get_loss
from ..math.nystrom import LANDMARK_METHODS
from ..math.validation import check_matrix, resolve_device, resolve_dtype
from .fit_paths import budget_bytes, fit as fit_model, memory_plan as plan_memory
from .anderson import POLICIES
from .exports import HeadExports
from .fixed_point import svd_plan
from .layout import make_batches
from .refit import lineage, refit as refit_version
from .verify import check_verify

__all__ = ["UniCon"]

SIMILARITIES = ("cosine", "dot")
SVD_SOLVERS = ("auto", "exact", "randomized")


class UniCon(HeadExports):
    """Closed-form contrastive alignment of two views (Sui, Wang & Do, ICLR 2026).

    Encoders f(x) = F1 φ_x(x) and g(y) = F2 φ_y(y) in R^r are found by a fixed
    point: with the similarities s of the current encoders, S(γ) = −∂L/∂s is fixed
    and the best rank-r map is W = F1ᵀF2 = [Φ_Xᵀ S Φ_Y]_r / ρ (a truncated SVD); the
    similarities are then recomputed, until W is a certified fixed point: its residual
    (:func:`unicon_dist.math.closed_form.fixed_point_residual`, zero iff the tangent part
    of C at W is ρW, scale-free for cosine similarity) is at most ``tol``.  The first step
    starts from s = 0.  S(γ) is never formed: Φ_Xᵀ S Φ_Y is streamed in tiles
    (:class:`unicon_dist.CrossProductOperator`).

    The defaults: centred and ridge-whitened views (``whiten=1e-3``; the first step is
    then regularised CCA), τ = 0.1, the "sqrt" factorization, and safeguarded Anderson
    mixing over the damped map (``solver="anderson"``, η = 0.5; see
    :mod:`unicon_dist.solver.anderson`), which reaches fixed points the paper's plain map
    (``solver="plain"``, ``damping=1``) cycles around.  With cosine similarity a fixed
    point exists only where the loss at τ still gains from sharper similarities: on
    poorly aligned data at small τ every residual stays above √2 and the fit ends at
    ``max_iter`` with a warning that says so (a larger τ has one).

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
    negatives : "auto", "full" or int
        All n² pairs, or a seeded split into batches of this size (one global SVD of
        the block-diagonal problem).  "auto": full negatives up to 4,096 pairs (a full
        pass then costs a few batched ones), batches of 1,024 above
        (:func:`unicon_dist.solver.layout.resolve_negatives`; the measurement is
        RESULTS §12).
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
    solver : {"anderson", "plain"}
        How the next iterate is chosen.  "plain": the damped map itself, W_{k+1} =
        G(W_k) (the paper's map when ``damping=1``; for reproductions).  "anderson":
        type-II Anderson mixing of the last 8 iterates of G, safeguarded by the residual
        (an extrapolation whose residual exceeds twice the lowest accepted one, or for
        "dot" whose L + R rises, is rejected and the damped map taken from the last
        accepted point with a halved step; see :mod:`unicon_dist.solver.anderson`).
    max_iter : int
        Maximum number of iterations (points evaluated, each one statistics pass, one
        product pass and one SVD), after the first step from s = 0.
    tol : float or None
        Stop when the residual of the current iterate is at most ``tol``
        (``converged_``).  None: 1e-5 with float32 tiles, 1e-7 with float64 (the
        resolved value is ``tol_``).
    loss_tol : float
        Also stop when the loss (cosine; the objective L + R for "dot") decreased by
        less than ``loss_tol`` times its value in the last iteration (``stop_reason_``
        "loss plateau"); 0 (the default) never stops there.
    damping : float
        η in (0, 1]: each step factors M_k = η C_k + (1 − η) a W_{k−1} instead of C_k.
        With cosine similarity (or the orthonormal factorization) a puts W_{k−1} on the
        scale of C_k's top-r singular values, so that only directions are averaged; with
        "dot" and "sqrt", a = ρ: a projected gradient step of length η/ρ on L + R (see
        :func:`unicon_dist.math.closed_form.damped_target`).  1 is the plain map; η < 1
        (a level shift, in SCF terms) keeps every fixed point of the plain map and
        converges to stationary points (P_T(C) = ρW) the plain map cycles around, also
        where W's subspaces are not C's leading ones (``history_[k]["map_residual"]``
        says how far from the plain map's fixed point).
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
        Per iteration k, the iterate W_k evaluated: "iteration", "loss" (L at W_k),
        "objective" (L + (ρ/2)‖W_k‖²), "criterion", "residual" (the certificate of W_k;
        also under "input_residual"), "map_residual" (distance to a fixed point of the
        plain map, exact C only), "step" (how W_k was made: "first step (s = 0)",
        "warm start", "damped map", "anderson(m)", ...), "accepted" (by the safeguard),
        "delta_w" (‖W_k − W_{k−1}‖/‖W_k‖), "seconds" and "phases" (seconds per pass), and
        the numerics of the step taken at W_k: "sigma_mean", "spectral_gap" (σ_r/σ_{r+1}
        of C, or of the damped target's sketch when C is matrix-free: "spectral_gap_of"),
        "svd_residual" (the randomized range finder's estimate of ‖M − QQᵀM‖_F/‖M‖_F for
        the matrix M it factored; None for LAPACK), and "lse_min", "lse_max",
        "log_space_batches" (pass 1's log-sum-exp statistics at W_k).
    initial_loss_ : float
        L at s = 0, where the iteration starts.
    loss_ : float
        L at the kept encoders.
    n_iter_ : int
    converged_ : bool
    best_iteration_ : int
        The iterate kept: the certified fixed point when the iteration converged, else
        the iterate of lowest residual (of lowest loss -- L + R for "dot" -- when
        ``loss_tol`` > 0).
    stop_reason_ : {"converged", "loss plateau", "max_iter"}
    tol_ : float
        The tolerance the fit used (``tol``, or its default for the tile precision).
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
        negatives="auto",
        batch_split: str = "random",
        similarity: str = "cosine",
        factorization: str = "sqrt",
        ridge: float = 0.0,
        solver: str = "anderson",
        max_iter: int = 30,
        tol: float | None = None,
        loss_tol: float = 0.0,
        damping: float = 0.5,
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
        self.solver = solver
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
        "temperature", "nu", "rho", "negatives", "batch_split", "similarity", "factorization", "ridge", "solver",
        "max_iter", "tol", "loss_tol", "damping", "svd", "svd_oversampling", "svd_power_iter", "seed", "device", "dtype",
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
        if self.solver not in POLICIES:
            raise ValueError(f"solver must be one of {POLICIES}, got {self.solver!r}")
        if self.tol is not None and not (isinstance(self.tol, (int, float)) and not isinstance(self.tol, bool)
                                         and math.isfinite(self.tol) and self.tol >= 0):
            raise ValueError(f"tol must be None or a number >= 0, got {self.tol!r}")
        if not (isinstance(self.loss_tol, (int, float)) and not isinstance(self.loss_tol, bool)
                and math.isfinite(self.loss_tol) and self.loss_tol >= 0):
            raise ValueError(f"loss_tol must be a number >= 0, got {self.loss_tol!r}")
        if isinstance(self.damping, bool) or not (isinstance(self.damping, (int, float)) and 0 < self.damping <= 1):
            raise ValueError(f"damping must be a number in (0, 1], got {self.damping!r}")
        if self.svd not in SVD_SOLVERS:
            raise ValueError(f"svd must be one of {SVD_SOLVERS}, got {self.svd!r}")
        budget_bytes(self.memory_budget)
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype of the tile arithmetic must be float32 or float64, got {self.dtype!r}")
        return loss_fn, kernels, device, dtype

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
        fit_model(self, X, Y, groups, executor=executor, checkpoint=checkpoint, resume=resume)
        self.lineage_ = lineage(None, self, "cold")
        return self

    def refit(self, store=None, *, mode: str = "exact", warm_start: bool = True, refresh_maps: bool = False,
              executor=None) -> "UniCon":
        """A new model on every row of the store this one was fitted on, after appends.

        The receiver is left unchanged.  The new model keeps this model's Nyström maps
        and, with ``warm_start``, starts the fixed point from this model's encoders
        instead of s = 0 (the exact mode: full passes over all rows).  Its ``lineage_``
        extends this model's: version, parent version, rows covered, new rows, start,
        iterations, seconds (see :mod:`unicon_dist.solver.refit`).

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
        return refit_version(self, store, mode=mode, warm_start=warm_start, refresh_maps=refresh_maps,
                             executor=executor)

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
        _, kernels, device, dtype = self.validate_params()
        return plan_memory(self, X, Y, kernels, device, dtype)

    def _svd_plan(self, mx: int, my: int) -> tuple[str, bool]:
        """(solver, matrix_free) for the rank-r step (:func:`unicon_dist.solver.fixed_point.svd_plan`)."""
        return svd_plan(self.svd, self.rank, self.svd_oversampling, self.svd_power_iter, mx, my)

    # ---------------------------------------------------------- checkpoints
    def checkpoint_fingerprint(self, loss_fn, data: dict) -> dict:
        """What a checkpoint must match to be resumed: the options, then the data.

        ``verbose`` and ``verify`` are left out (they change no number).  Scalar options come before the
        loss and kernel objects, so that a changed temperature is reported as such rather
        than as the loss that carries it.
        """
        params = params_json(self.get_params(), loss_fn)
        del params["verbose"], params["verify"]  # neither changes a number of the fit
        ordered = sorted(params, key=lambda k: isinstance(params[k], dict))
        return {**{k: params[k] for k in ordered}, **data}

    # ------------------------------------------------------------- encoding
    def check_fitted(self):
        """Raise RuntimeError unless the model is fitted (or loaded)."""
        if not hasattr(self, "F1_"):
            raise RuntimeError("this UniCon model is not fitted yet; call fit() or UniCon.load() first")

    def _encode(self, A, which: str):
        self.check_fitted()
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
        Z = features(A, fmap, dtype) @ Ft.T
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
        """Write the fitted model to one .npz file (JSON header + arrays), atomically.

        The format is :mod:`unicon_dist.io.model_files`'s (``"unicon_dist.model/1"``).
        """
        self.check_fitted()
        return save_model(path, self.get_params(), {k: getattr(self, k) for k in FITTED if hasattr(self, k)})

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
        return load_model(path, lambda params: cls(**params))


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

