"""The model file: one .npz (format ``"unicon_dist.model/1"``) holding a fitted UniCon.

Written and read through :mod:`unicon_dist.io.artifacts` (atomic write, one checked
reader, no pickle).  The JSON header holds ``format``, ``version``, ``params`` (the
constructor options, the loss and kernel objects as their parameters), the sizes
(``n_features_x``, ``n_features_y``, ``n_inputs_x``, ``n_inputs_y``), ``maps`` (per view
the Nyström kernel, eigenvalue floor and spectrum, and the centring/whitening stage),
``svd_solver``, the solve's record (``history``, ``n_iter``, ``converged``,
``stop_reason``, ``loss``, ``initial_loss``, ``best_iteration``, ``diagnostics``) and its
provenance (``data``, ``lineage``).  Arrays: ``F1``, ``F2``, the maps' ``landmarks_<side>``,
``normalization_<side>``, ``whitening_mean_<side>``, ``whitening_matrix_<side>``, and
``C`` when the model kept the matrix its last step factored.  Files of older versions
lack ``stop_reason``, ``data``, ``lineage``, ``diagnostics`` or ``C``; they load with
those unset.

This layer knows the feature maps and losses of :mod:`unicon_dist.math` but not the
estimator: models cross it as a dict of their parameters and one of their fitted
attributes (:data:`FITTED`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..math.kernels import Kernel, kernel_from_params
from ..math.losses import loss_from_params
from ..math.nystrom import NystroemMap
from ..math.whitening import FeatureWhitening
from ..version import __version__
from .artifacts import ArtifactError, atomic_save_npz, load_npz

__all__ = ["FORMAT", "FITTED", "params_json", "maps_state", "maps_from_state", "save_model", "load_model"]

FORMAT = "unicon_dist.model/1"
# the fitted attributes a model file holds (W_ is F1_ᵀF2_, recomputed on load)
FITTED = (
    "F1_", "F2_", "C_", "map_x_", "map_y_", "loss_fn_", "svd_solver_", "n_features_x_", "n_features_y_",
    "n_inputs_x_", "n_inputs_y_", "history_", "n_iter_", "converged_", "stop_reason_", "loss_", "initial_loss_",
    "best_iteration_", "data_", "lineage_", "diagnostics_",
)
# header keys every model file has
_KEYS = ("params", "maps", "svd_solver", "n_features_x", "n_features_y", "n_inputs_x", "n_inputs_y", "history",
         "n_iter", "converged", "loss", "initial_loss", "best_iteration")


def params_json(params: dict, loss_fn) -> dict:
    """Constructor options as JSON: the loss as its parameters, kernel objects as theirs.

    Parameters
    ----------
    params : dict
        ``get_params()`` of the estimator.
    loss_fn : ContrastiveLoss
        The resolved loss (``loss`` may be a name).
    """
    params = dict(params)
    params["loss"] = loss_fn.params()
    for key in ("kernel", "kernel_x", "kernel_y"):
        if isinstance(params[key], Kernel):
            params[key] = {"kernel": params[key].params()}
    return params


def _params_from_json(params: dict) -> dict:
    """Inverse of :func:`params_json`: the loss and kernel objects rebuilt."""
    params = dict(params)
    params["loss"] = loss_from_params(params.pop("loss"))
    for key in ("kernel", "kernel_x", "kernel_y"):
        if isinstance(params.get(key), dict):
            params[key] = kernel_from_params(params[key]["kernel"])
    return params


def maps_state(map_x, map_y) -> tuple[dict, dict]:
    """The fitted feature maps as (JSON header part, arrays); inverse of :func:`maps_from_state`.

    Parameters
    ----------
    map_x, map_y : NystroemMap, FeatureWhitening or None
        The maps of the two views (None: the inputs are the features).
    """
    maps, arrays = {}, {}
    for side, fmap in (("x", map_x), ("y", map_y)):
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


def maps_from_state(maps: dict, arrays: dict, device=None) -> dict:
    """{"x": map or None, "y": map or None} from what :func:`maps_state` wrote."""
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


def save_model(path, params: dict, fitted: dict) -> Path:
    """Write a fitted model to ``path`` atomically.

    Parameters
    ----------
    path : str or Path
    params : dict
        The constructor options (``get_params()``).
    fitted : dict
        The fitted attributes by name (those of :data:`FITTED` the model has; F1_, F2_,
        the maps, ``loss_fn_``, the sizes and the solve's record are required).

    Returns
    -------
    Path
    """
    maps, map_arrays = maps_state(fitted["map_x_"], fitted["map_y_"])
    arrays = {"F1": fitted["F1_"], "F2": fitted["F2_"], **map_arrays}
    if fitted.get("C_") is not None:
        arrays["C"] = fitted["C_"]
    header = {
        "format": FORMAT,
        "version": __version__,
        "params": params_json(params, fitted["loss_fn_"]),
        "n_features_x": fitted["n_features_x_"],
        "n_features_y": fitted["n_features_y_"],
        "n_inputs_x": fitted["n_inputs_x_"],
        "n_inputs_y": fitted["n_inputs_y_"],
        "maps": maps,
        "svd_solver": fitted["svd_solver_"],
        "history": fitted["history_"],
        "n_iter": fitted["n_iter_"],
        "converged": fitted["converged_"],
        "stop_reason": fitted.get("stop_reason_"),
        "loss": fitted["loss_"],
        "initial_loss": fitted["initial_loss_"],
        "best_iteration": fitted["best_iteration_"],
        "data": fitted.get("data_"),
        "lineage": fitted.get("lineage_", []),
        "diagnostics": fitted.get("diagnostics_"),
    }
    return atomic_save_npz(path, header, arrays)


def load_model(path, build):
    """Read a model file: ``build(params)`` makes the estimator, whose fitted attributes are then set.

    Parameters
    ----------
    path : str or Path
    build : callable
        ``build(params)`` with the constructor options (loss and kernel objects rebuilt)
        returns the unfitted estimator.

    Returns
    -------
    The estimator ``build`` made, fitted.

    Raises
    ------
    FileNotFoundError
        No such file.
    ArtifactError
        (a ValueError) naming the file: it is damaged (empty, zero-filled, truncated, a
        malformed header, NaN or Inf in an array) or not a model (another file, a
        checkpoint).
    """
    header, arrays = load_npz(path, kind="model", format=FORMAT, required=("F1", "F2"), keys=_KEYS)
    try:
        params = _params_from_json(header["params"])
        model = build(params)
        maps = maps_from_state(header["maps"], arrays)
        fitted = {
            "map_x_": maps["x"], "map_y_": maps["y"],
            "svd_solver_": header["svd_solver"],
            "loss_fn_": params["loss"],
            "F1_": arrays["F1"], "F2_": arrays["F2"], "W_": arrays["F1"].T @ arrays["F2"],
            "n_features_x_": int(header["n_features_x"]), "n_features_y_": int(header["n_features_y"]),
            "n_inputs_x_": int(header["n_inputs_x"]), "n_inputs_y_": int(header["n_inputs_y"]),
            "history_": header["history"],
            "n_iter_": int(header["n_iter"]),
            "converged_": bool(header["converged"]),
            "stop_reason_": header.get("stop_reason"),
            "loss_": float(header["loss"]),
            "initial_loss_": float(header["initial_loss"]),
            "best_iteration_": int(header["best_iteration"]),
            "data_": header.get("data"),
            "lineage_": header.get("lineage", []),
            "diagnostics_": header.get("diagnostics"),
            "C_": arrays.get("C"),
        }
        for name, value in fitted.items():
            setattr(model, name, value)
        return model
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # every key is there (checked above): a value has the wrong type or shape
        written = header.get("version")
        other = "" if written == __version__ else f" (or written by unicon_dist {written}, this is {__version__})"
        raise ArtifactError(path, f"it is damaged{other}: its header and arrays do not describe a model "
                            f"({type(exc).__name__}: {exc})", kind="model") from exc
