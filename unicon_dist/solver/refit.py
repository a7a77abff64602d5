"""Re-solving a fitted UniCon after rows were appended to its store, and the lineage of versions.

Two modes (:meth:`unicon_dist.UniCon.refit`): "exact", the fixed point over all rows,
warm-started from the parent's encoders; "fast", one damped step on the parent's C with
the new rows' block folded in.  Every version records where it came from in ``lineage_``.
"""

from __future__ import annotations

import time

import torch

from ..data.provenance import check_appended, store_provenance
from ..data.rows import StoreRows
from .diagnostics import solve_diagnostics
from .executor import LocalExecutor
from .feature_maps import base_map, landmark_counts
from .fixed_point import FixedPointOptions, prepare_estimator, step
from .operator import CrossProductOperator
from .options import PassOptions
from .fit_paths import OffsetRows, as_store, fit_store, plan_passes

__all__ = ["refit", "fast_update", "lineage"]


def lineage(parent: dict | None, model, start: str, seconds: float | None = None) -> list:
    """``model.lineage_``: the parent's records (none for a first fit) and one for this version.

    Parameters
    ----------
    parent : dict or None
        {"lineage": the parent's lineage_, "n_rows": the rows it covered}.
    model : UniCon
        The new version, fitted (``data_``, ``n_iter_``, ``converged_``, ``history_``).
    start : {"cold", "warm", "fast"}
    seconds : float, optional
        The version's solve time (default: the sum over ``history_``).
    """
    previous = parent["lineage"][-1]["version"] if parent else None
    return (parent["lineage"] if parent else []) + [{
        "version": previous + 1 if parent else 1,
        "parent": previous,
        "rows": [0, int(model.data_["n_rows"])],
        "new_rows": [int(parent["n_rows"]), int(model.data_["n_rows"])] if parent else None,
        "start": start,
        "iterations": model.n_iter_,
        "converged": model.converged_,
        "seconds": float(sum(h["seconds"] for h in model.history_)) if seconds is None else seconds,
    }]


def refit(model, store=None, *, mode: str = "exact", warm_start: bool = True, refresh_maps: bool = False,
          executor=None):
    """A new version of fitted ``model`` on every row of its grown store (see :meth:`UniCon.refit`)."""
    model.check_fitted()
    data = getattr(model, "data_", None) or {}
    target = store if store is not None else data.get("store")
    store = as_store(target) if target is not None else None
    if store is None:
        raise ValueError("refit needs a pair store (this model records none)")
    check_appended(data, store)
    params = model.get_params()
    params["similarity"] = str(params["similarity"])
    params["loss"] = model.loss_fn_
    new = type(model)(**params)
    loss_fn, kernels, device, dtype = new.validate_params()
    parent = {"lineage": list(getattr(model, "lineage_", []) or [{"version": 1}]), "n_rows": data["n_rows"],
              "sigma_mean": (model.history_[-1].get("sigma_mean") if model.history_ else None)}
    if mode == "fast" and refresh_maps:
        raise ValueError("refresh_maps=True needs mode='exact' (the fast update folds rows into C in the "
                         "model's own feature space)")
    if mode == "fast":
        return fast_update(new, model, store, loss_fn, device, dtype, parent)
    if mode != "exact":
        raise ValueError(f"mode must be 'exact' or 'fast', got {mode!r}")
    start = (torch.as_tensor(model.F1_), torch.as_tensor(model.F2_)) if warm_start else None
    if refresh_maps and (model.center or model.whiten is not None):
        fit_store(new, store, None, executor, loss_fn, kernels, device, dtype,
                  maps=[base_map(m) for m in (model.map_x_, model.map_y_)], start=start,
                  carry_from=(model.map_x_, model.map_y_), sigma_start=parent["sigma_mean"])
    else:
        fit_store(new, store, None, executor, loss_fn, kernels, device, dtype, maps=(model.map_x_, model.map_y_),
                  start=start, sigma_start=parent["sigma_mean"])
    new.lineage_ = lineage(parent, new, "cold" if start is None else "warm")
    return new


def fast_update(new, parent_model, store, loss_fn, device, dtype, parent: dict):
    """Fold the appended rows into the parent's C at its encoders; one SVD (see :meth:`UniCon.refit`).

    Parameters
    ----------
    new : UniCon
        The unfitted new version (the parent's options, validated).
    parent_model : UniCon
        The fitted parent.
    store : PairStore
        The parent's store, grown by appends.
    parent : dict
        The parent's lineage record (see :func:`lineage`).
    """
    if not (parent_model.converged_ or getattr(parent_model, "stop_reason_", None) == "loss plateau"):
        raise ValueError("mode='fast' needs a model that stopped at its fixed point or at a loss plateau "
                         f"(this one: {getattr(parent_model, 'stop_reason_', None) or 'not converged'}; its C does "
                         "not belong to its encoders); use mode='exact', or damping < 1 to reach convergence")
    if getattr(parent_model, "C_", None) is None:
        raise ValueError("mode='fast' needs the C the model was solved from; this model has none (fitted with "
                         "a matrix-free SVD, resumed, or saved by an older unicon_dist); use mode='exact'")
    t0 = time.perf_counter()
    n_old, n = parent_model.data_["n_rows"], len(store)
    new.map_x_, new.map_y_ = parent_model.map_x_, parent_model.map_y_
    prepare_estimator(new, loss_fn, store.dim_x, store.dim_y, parent_model.n_features_x_,
                      parent_model.n_features_y_)
    F1 = torch.as_tensor(parent_model.F1_, device=device)
    F2 = torch.as_tensor(parent_model.F2_, device=device)
    C = torch.as_tensor(parent_model.C_, dtype=torch.float64, device=device) * n_old
    loss_new = float("nan")
    if n > n_old:
        plan = plan_passes(new, LocalExecutor(), store, n - n_old, new.n_features_x_, new.n_features_y_, dtype,
                           landmark_counts((new.map_x_, new.map_y_)))
        rows = StoreRows(str(store.path), new.map_x_, new.map_y_, F1, F2, str(new.similarity), dtype,
                         str(device), _store=store)
        options = PassOptions(loss=loss_fn, negatives=new.negatives, batch_split=new.batch_split, seed=new.seed,
                              norm_bound=(1.0, 1.0) if new.similarity == "cosine" else None, device=device,
                              dtype=dtype).with_plan(plan)
        op = CrossProductOperator.from_loader(
            OffsetRows(rows, n_old), n - n_old, (new.n_features_x_, new.n_features_y_), int(new.rank),
            groups=store.read_groups(slice(n_old, n)) if store.has_groups else None, options=options,
        )
        C += op.materialize() * (n - n_old)
        loss_new = op.loss
    C /= n
    # the same (damped) step the parent's iteration takes, from the parent's W
    new.svd_solver_, new._matrix_free = parent_model.svd_solver_, False
    F1, F2, _, step_diag = step(C, torch.as_tensor(parent_model.W_, dtype=torch.float64, device=device),
                                new.damping < 1, None, FixedPointOptions.from_estimator(new),
                                factors=(parent_model.F1_, parent_model.F2_))
    new.F1_, new.F2_ = F1.cpu().numpy(), F2.cpu().numpy()
    new.W_ = new.F1_.T @ new.F2_
    new.C_ = C.cpu().numpy()
    seconds = time.perf_counter() - t0
    # the loss over all rows would need the passes this mode avoids: only the new rows'
    new.history_ = [{"iteration": 1, "loss_new_rows": loss_new, "seconds": seconds, "mode": "fast", **step_diag}]
    new.n_iter_, new.best_iteration_, new.converged_ = 1, 1, False
    new.stop_reason_ = "fast update"
    new.loss_ = new.initial_loss_ = float("nan")
    new.data_ = store_provenance(store, n)
    new.lineage_ = lineage(parent, new, "fast", seconds)
    new.diagnostics_ = solve_diagnostics(new, None)
    return new
