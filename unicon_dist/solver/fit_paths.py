"""The three ways a UniCon fit reads its rows: arrays in memory, arrays under a budget, a store.

:func:`fit` dispatches.  Arrays without a ``memory_budget`` are featurised once and the
passes run over the feature rows in memory.  A pair store -- and arrays under a budget,
through :class:`~unicon_dist.data.rows.ArrayPairs` -- take the panel path
(:func:`fit_store`): everything n-sized stays where the rows are, a pass reads them panel
by panel, and the panels, tiles and every other buffer of the fit come out of
``memory_budget`` (:func:`plan_passes`, before any row is read).  There a whitening
stage is folded into the encoders (:mod:`.folded`): panels are only centred, and the
whitening matrices multiply C once per iteration.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import torch

from ..data.provenance import store_provenance
from ..data.rows import ArrayPairs, FeatureRows, StoreRows, features
from ..data.store import PairStore
from ..io.checkpoints import CheckpointRun, array_fingerprint, store_fingerprint
from ..math.positives import canonical_groups
from ..math.validation import check_matrix, check_same_rows
from ..math.whitening import FeatureWhitening
from . import folded
from .executor import Executor, LocalExecutor
from .feature_maps import MOMENT_ROWS, MapFitter, base_map, carry_encoder, landmark_counts
from .fixed_point import prepare_estimator, solve_estimator, svd_plan
from .layout import make_batches
from .operator import CrossProductOperator
from .options import PassOptions
from .planning import feature_map_bytes, feature_transform_row_bytes, landmark_selection_bytes, parse_bytes, step_bytes
from .progress import FIT_LOGGER, LogProgress

__all__ = ["fit", "as_store", "budget_bytes", "check_negative_pairs", "OffsetRows", "open_checkpoint",
           "plan_passes", "memory_plan", "fit_in_memory", "fit_store"]

logger = logging.getLogger(FIT_LOGGER)


def fit(model, X, Y, groups, *, executor, checkpoint, resume: bool):
    """Fit ``model`` on arrays X, Y or on a pair store X (the work of :meth:`UniCon.fit`, same arguments)."""
    loss_fn, kernels, device, dtype = model.validate_params()
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint= (the checkpoint file to continue from)")
    store = as_store(X)
    if store is not None:
        if Y is not None:
            raise ValueError("fit(store) takes both views from the store; do not pass Y")

        def data():
            use_groups = groups is not False and store.has_groups
            return store_fingerprint(store.path, len(store), store.dim_x, store.dim_y, store.dtype, use_groups)

        run = open_checkpoint(model, checkpoint, resume, loss_fn, data, device)
        return fit_store(model, store, groups, executor, loss_fn, kernels, device, dtype, checkpoint=run)
    if executor is not None:
        raise ValueError("executor= runs passes over a PairStore; pass the store (or its path) as X")
    if Y is None:
        raise ValueError("Y is required when X is an array (or pass a PairStore as X)")
    X = check_matrix(X, "X", device=device)
    Y = check_matrix(Y, "Y", device=device)
    n = check_same_rows(X=X, Y=Y)
    if n < 2:
        raise ValueError(f"need at least 2 pairs to contrast, got {n}")
    check_negative_pairs(n, groups, model.negatives, model.batch_split, model.seed)
    run = open_checkpoint(model, checkpoint, resume, loss_fn, lambda: array_fingerprint(X, Y, groups), device)
    fitter = MapFitter.from_estimator(model, restored=None if run is None else run.maps)
    if budget_bytes(model.memory_budget) is None:
        return fit_in_memory(model, X, Y, groups, fitter, kernels, loss_fn, device, dtype, run)

    # under a budget the rows stream through the panels of a store fit (nothing
    # n-sized but the inputs themselves and the per-pair statistics)
    def bases():
        return [base_map(fitter.fit(A, k, name)) for A, k, name in ((X, kernels[0], "X"), (Y, kernels[1], "Y"))]

    return fit_store(model, ArrayPairs(X, Y, groups), None, None, loss_fn, kernels, device, dtype, fit_bases=bases,
                     checkpoint=run)


def open_checkpoint(model, path, resume: bool, loss_fn, data, device) -> CheckpointRun | None:
    """The checkpoint of a fit of ``model`` (None without ``path``); ``data()`` gives the data part
    of its fingerprint (:meth:`UniCon.checkpoint_fingerprint`)."""
    if path is None:
        return None
    return CheckpointRun.open(path, model.checkpoint_fingerprint(loss_fn, data()), resume=resume, device=device)


def as_store(X):
    """X as a PairStore when it is one or a path to one; None for arrays."""
    if isinstance(X, (str, os.PathLike)):
        return PairStore.open(X)
    if hasattr(X, "read") and hasattr(X, "iter_blocks") and hasattr(X, "dim_x"):
        return X
    return None


def budget_bytes(memory_budget) -> int | None:
    """``memory_budget`` (bytes or a size string such as "64MiB") in bytes; None when no budget is set."""
    if memory_budget is None:
        return None
    try:
        return parse_bytes(memory_budget)
    except ValueError as exc:
        raise ValueError(f"memory_budget {exc}") from None


class OffsetRows:
    """A row loader over the rows from ``offset`` on (the rows appended since a fit).

    ``OffsetRows(loader, k)(rows)`` is ``loader(rows + k)``, for a slice or an index array.
    """

    def __init__(self, loader, offset: int):
        self.loader, self.offset = loader, offset

    def __call__(self, rows):
        if isinstance(rows, slice):
            return self.loader(slice(rows.start + self.offset, rows.stop + self.offset))
        return self.loader(np.asarray(rows) + self.offset)


def check_negative_pairs(n: int, groups, negatives, batch_split: str, seed: int) -> None:
    """Raise ValueError when ``groups`` leave the loss no negative pair to contrast.

    Parameters
    ----------
    n : int
        Number of pairs.
    groups : array_like of int, shape (n,), or None
        Group labels (None: one-to-one pairs).
    negatives, batch_split, seed
        As in :class:`~unicon_dist.UniCon`; negatives are drawn within the batches of
        :func:`unicon_dist.solver.layout.make_batches` only.

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


def plan_passes(model, executor, store, n: int, mx: int, my: int, dtype, sizes=(None, None), *,
                landmarks: bool = False):
    """The :class:`~unicon_dist.PanelPlan` of passes over n rows of ``store``, the whole fit counted.

    Besides the panels, tiles and per-pair statistics (:func:`~unicon_dist.plan_panels`),
    the budget holds the step (C and its SVD, or the randomized SVD's blocks), the
    Nyström maps of ``sizes`` landmarks (None: linear), the centring/whitening moments,
    the store's read buffers and, with ``landmarks`` (a fit from arrays), the landmark
    selection over all rows.  A budget that cannot hold them is a ValueError naming the
    smallest one that can, raised before any row is read.
    """
    matrix_free = svd_plan(model.svd, model.rank, model.svd_oversampling, model.svd_power_iter, mx, my)[1]
    extra = step_bytes(mx, my, int(model.rank), matrix_free=matrix_free, oversampling=int(model.svd_oversampling))
    for L, dim, m in zip(sizes, (store.dim_x, store.dim_y), (mx, my)):
        if L is not None:
            extra += feature_map_bytes(L, dim)
            if landmarks:
                extra += landmark_selection_bytes(n, L, str(model.landmarks))
        if model.center or model.whiten is not None:
            extra += 4 * 8 * m * m  # float64 moments, their eigendecomposition and the whitening matrix
    extra += store.read_buffer_bytes()
    # one view's transform runs at a time, on the rows of the panel being loaded
    per_row = max([feature_transform_row_bytes(L) for L in sizes if L is not None], default=0)
    return executor.plan(
        n, dim_x=store.dim_x, dim_y=store.dim_y, features_x=mx, features_y=my, rank=int(model.rank),
        itemsize=torch.finfo(dtype).bits // 8, store_itemsize=store.itemsize,
        memory_budget=budget_bytes(model.memory_budget), extra_bytes=extra, row_extra_bytes=per_row,
        what=f"pairs ({store.path})",
    )


def memory_plan(model, X, Y, kernels, device, dtype):
    """The plan of :meth:`UniCon.memory_plan` (options already validated into ``kernels``, ``device``, ``dtype``)."""
    store = as_store(X)
    if store is None:
        if Y is None:
            raise ValueError("Y is required when X is an array (or pass a PairStore as X)")
        X, Y = check_matrix(X, "X", device=device), check_matrix(Y, "Y", device=device)
        check_same_rows(X=X, Y=Y)
        store = ArrayPairs(X, Y)
    n = len(store)
    dims = (store.dim_x, store.dim_y)
    fitter = MapFitter.from_estimator(model)
    sizes = [fitter.size(kernel, n) for kernel in kernels]
    mx, my = (dim if L is None else L for L, dim in zip(sizes, dims))
    # with a verifier the passes are planned for its float64 twin (see fit_store)
    return plan_passes(model, LocalExecutor(), store, n, mx, my, dtype if model.verify is None else torch.float64,
                       sizes, landmarks=isinstance(store, ArrayPairs))


def fit_in_memory(model, X, Y, groups, fitter, kernels, loss_fn, device, dtype, checkpoint=None):
    """Fit ``model`` holding every feature row: the (Nyström) features formed once, the passes over them.

    X, Y are validated tensors on ``device``; ``fitter`` a :class:`~.feature_maps.MapFitter`
    of the model's options; ``checkpoint`` as in :func:`fit_store`.  Returns ``model``.
    """
    bases = [base_map(fitter.fit(A, k, name)) for A, k, name in ((X, kernels[0], "X"), (Y, kernels[1], "Y"))]
    # the (Nyström) features once: the moments and the passes both use them
    phi_x, phi_y = features(X, bases[0], dtype), features(Y, bases[1], dtype)
    model.map_x_, model.map_y_ = fitter.preprocess(bases, lambda rows: (phi_x[rows], phi_y[rows]), X.shape[0],
                                                   MOMENT_ROWS, dtype, featurized=True)
    phi_x, phi_y = (m.apply(F) if isinstance(m, FeatureWhitening) else F
                    for m, F in ((model.map_x_, phi_x), (model.map_y_, phi_y)))
    prepare_estimator(model, loss_fn, X.shape[1], Y.shape[1], phi_x.shape[1], phi_y.shape[1])
    model.data_ = {"source": "arrays", "n_rows": int(X.shape[0]), "dim_x": int(X.shape[1]), "dim_y": int(Y.shape[1])}

    matrix_free = svd_plan(model.svd, model.rank, model.svd_oversampling, model.svd_power_iter,
                           phi_x.shape[1], phi_y.shape[1])[1]

    similarity = str(model.similarity)
    fit_rows = FeatureRows(phi_x, phi_y, similarity)

    def operator(F1, F2, phi=None):
        # S(γ) at the encoders over in-memory features; F1 = None means s = 0
        rows = fit_rows if phi is None else FeatureRows(*phi, similarity)
        n = rows.phi_x.shape[0]
        return CrossProductOperator.from_loader(
            rows.at(F1, F2), n, (rows.phi_x.shape[1], rows.phi_y.shape[1]), 1 if F1 is None else int(F1.shape[0]),
            groups=groups, loss=model.loss_fn_, negatives=model.negatives, batch_split=model.batch_split,
            seed=model.seed, constant=F1 is None, norm_bound=(1.0, 1.0) if similarity == "cosine" else None,
            device=rows.phi_x.device, dtype=rows.phi_x.dtype, matrix_free=matrix_free,
            progress=LogProgress(logger, rows=n) if model.verbose else None,
        )

    def verifier_operator(F1, F2, precision):
        # the verifier's operators: the fit's features, or all of it again in float64
        if precision == dtype:
            return operator(F1, F2)
        return operator(F1, F2, [features(A, fmap, precision) for A, fmap in ((X, model.map_x_), (Y, model.map_y_))])

    return solve_estimator(model, operator, device, checkpoint=checkpoint, verifier_operator=verifier_operator,
                           dtype=dtype)


def fit_store(model, store, groups, executor, loss_fn, kernels, device, dtype, *, maps=None, start=None,
              carry_from=None, fit_bases=None, checkpoint=None, sigma_start=None):
    """Fit ``model`` on the rows of ``store``, streamed through the passes in panels.

    Parameters
    ----------
    model : UniCon
        Options validated into ``loss_fn``, ``kernels`` (x, y), ``device`` and ``dtype``.
    store : PairStore or ArrayPairs
        The rows; :class:`~unicon_dist.data.rows.ArrayPairs` for a fit from arrays under a
        memory budget, whose base feature maps ``fit_bases()`` fits from all rows in memory.
    groups : None or False
        None: the store's own groups when it has them; False: ignore them.
    executor : LocalExecutor, RayExecutor or None
        Runs the passes (default: a new :class:`~unicon_dist.LocalExecutor`).
    maps : (map_x, map_y), optional
        Keep these feature maps (a refit); with ``carry_from`` (the parent's maps) their
        centring/whitening is re-estimated on all rows and the warm start ``start``
        carried over to the new whitening.
    start : (F1, F2), optional
        Warm start of the fixed point; ``sigma_start`` its step's mean singular value.
    checkpoint : CheckpointRun, optional
        Written after every step; resumed from when it holds a state.

    Returns
    -------
    model
    """
    arrays = isinstance(store, ArrayPairs)
    # the verifier compares its float64 twin tile by tile, so both follow one plan,
    # sized for float64 panels when there is a verifier
    plan_dtype = dtype if model.verify is None else torch.float64
    n = len(store)
    if n < 2:
        raise ValueError(f"pair store {store.path} holds {n} pairs; need at least 2 to contrast")
    if groups is False:
        groups = None
    elif groups is not None:
        raise ValueError("fit(store) uses the store's own groups; pass groups=False to ignore them")
    elif store.has_groups:
        groups = store.read_groups()
    check_negative_pairs(n, groups, model.negatives, model.batch_split, model.seed)
    executor = LocalExecutor() if executor is None else executor
    if not isinstance(executor, Executor):
        raise TypeError(f"executor must follow unicon_dist.solver.executor.Executor (distributed, plan, "
                        f"cross_product_operator), e.g. LocalExecutor() or RayExecutor(); got {type(executor).__name__}")
    # the driver of a distributed executor (e.g. a CPU-only Ray head) keeps its own
    # state -- feature maps, encoders, W -- on the CPU; ``device`` is where workers compute
    driver = torch.device("cpu") if executor.distributed else device
    fitter = MapFitter.from_estimator(model, restored=None if checkpoint is None else checkpoint.maps)

    def read(rows, side):
        x, y, _ = store.read(rows)
        return torch.as_tensor(x if side == "x" else y, device=driver)

    if maps is None:
        # every buffer planned before any work: the maps' sizes are bounded by their landmarks
        bound = [fitter.size(kernel, n) for kernel in kernels]
        plan_passes(model, executor, store, n, *(dim if L is None else L for L, dim in
                                                 zip(bound, (store.dim_x, store.dim_y))),
                    plan_dtype, bound, landmarks=arrays)
        if fit_bases is not None:
            maps = fit_bases()
        else:
            maps = [
                fitter.fit_rows(lambda rows, s=side: read(rows, s), n, dim, kernel, side.upper())
                for side, kernel, dim in (("x", kernels[0], store.dim_x), ("y", kernels[1], store.dim_y))
            ]
        preprocess = True
    else:
        # a refit keeps its parent's maps, whitening included, unless it refreshes them
        preprocess = carry_from is not None
    mx = store.dim_x if maps[0] is None else maps[0].n_features
    my = store.dim_y if maps[1] is None else maps[1].n_features
    sizes = landmark_counts(maps)
    verify_plan = model.plan_ = plan_passes(model, executor, store, n, mx, my, plan_dtype, sizes,
                                            landmarks=arrays and preprocess)
    if model.verify is not None and dtype != torch.float64:
        # tiles of as many elements in both precisions: the fit's take a budget
        # scaled by its itemsize (plan_tiles divides the budget by bytes per element)
        model.plan_ = dataclasses.replace(
            verify_plan, tile_budget=verify_plan.tile_budget * (torch.finfo(dtype).bits // 8) // 8)
    plan = model.plan_
    if preprocess:
        def read_pair(rows):
            x, y, _ = store.read(rows)
            return torch.as_tensor(x, device=driver), torch.as_tensor(y, device=driver)

        maps = fitter.preprocess(maps, read_pair, n, plan.panel_rows, dtype)
        if carry_from is not None and start is not None:
            start = tuple(carry_encoder(F, old, new) for F, old, new in zip(start, carry_from, maps))
    model.map_x_, model.map_y_ = maps
    model.data_ = ({"source": "arrays", "n_rows": int(n), "dim_x": store.dim_x, "dim_y": store.dim_y}
                   if arrays else store_provenance(store, n))
    prepare_estimator(model, loss_fn, store.dim_x, store.dim_y, mx, my)
    if model.verbose:
        logger.info("fit from %s: %d pairs in panels of %d rows (%s)", store.path, n, plan.panel_rows, executor)
    similarity, cosine = str(model.similarity), str(model.similarity) == "cosine"
    matrix_free = svd_plan(model.svd, model.rank, model.svd_oversampling, model.svd_power_iter, mx, my)[1]
    options = PassOptions(loss=model.loss_fn_, negatives=model.negatives, batch_split=model.batch_split,
                          seed=model.seed, norm_bound=(1.0, 1.0) if cosine else None, device=device,
                          matrix_free=matrix_free)

    fitted = (model.map_x_, model.map_y_)
    # whitening folded into the encoders (solver/folded.py): every panel load then only
    # centres its features, and A multiplies C once per iteration instead
    fold = folded.foldable(fitted)

    def rows_of(F1, F2, precision):
        # a picklable loader: a Ray worker reopens the store from its path
        stages, (E1, E2) = folded.folded_loader_parts(fitted, (F1, F2)) if fold else (fitted, (F1, F2))
        return StoreRows(str(store.path), *stages, E1, E2, similarity, precision, str(device), _store=store)

    def folding(op):
        return folded.FoldedOperator(op, *(getattr(m, "matrix", None) for m in fitted)) if fold else op

    def make_operator(F1, F2):
        return folding(executor.cross_product_operator(
            rows_of(F1, F2, dtype), n, (mx, my), 1 if F1 is None else int(model.rank), plan=plan, groups=groups,
            options=PassOptions.of(options, constant=F1 is None, dtype=dtype,
                                   progress=LogProgress(logger, rows=n) if model.verbose else None),
        ))

    def verifier_operator(F1, F2, precision):
        # on the driver, panel by panel, whatever executes the fit's passes; folded as the
        # fit's passes are, so the float64 twin checks the computation the fit made
        return folding(LocalExecutor().cross_product_operator(
            rows_of(F1, F2, precision), n, (mx, my), int(model.rank),
            plan=verify_plan if precision == torch.float64 else plan,
            groups=groups, options=PassOptions.of(options, dtype=precision),
        ))

    return solve_estimator(model, make_operator, driver, init=start, sigma_start=sigma_start, checkpoint=checkpoint,
                           verifier_operator=verifier_operator, dtype=dtype)
