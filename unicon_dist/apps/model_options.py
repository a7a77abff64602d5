"""The ``[model]`` table of job and study files: TOML values to checked UniCon options.

A table is read in two steps.  :func:`model_kwargs` checks each key's TOML type and turns
table-valued kernels and losses, size strings and ``whiten = false`` into what
:class:`~unicon_dist.solver.estimator.UniCon` takes; :func:`check_model` then runs UniCon's
own parameter validation and reports every bad option, not just the first.
:func:`check_model_against_store` adds the bounds that need a store's schema (rank against
the feature count, landmarks against the rows).
"""

from __future__ import annotations

import inspect

from ..math.kernels import Linear, get_kernel
from ..math.losses import get_loss
from ..solver.estimator import UniCon
from ..solver.planning import parse_bytes
from .config_checks import StoreInfo, is_int, is_number, type_name, unknown_keys

__all__ = [
    "MODEL_TYPES", "DEFAULT_LANDMARKS", "model_param_names", "model_kwargs", "option_error", "check_model",
    "check_model_against_store", "feature_bound",
]

# the number of landmarks UniCon takes by default for a nonlinear kernel (capped by n)
DEFAULT_LANDMARKS = 1000

# expected TOML types per UniCon option; options not listed here (added to UniCon later)
# go straight to UniCon's own validation
_STR, _INT, _NUM, _BOOL, _TABLE = "string", "integer", "number", "boolean", "table"
MODEL_TYPES = {
    "rank": (_INT,), "kernel": (_STR, _TABLE), "kernel_x": (_STR, _TABLE), "kernel_y": (_STR, _TABLE),
    "n_landmarks": (_INT,), "landmarks": (_STR,), "eig_floor": (_NUM,), "loss": (_STR, _TABLE),
    "temperature": (_NUM,), "nu": (_NUM,), "rho": (_NUM,), "negatives": (_STR, _INT), "similarity": (_STR,),
    "factorization": (_STR,), "ridge": (_NUM,), "solver": (_STR,), "max_iter": (_INT,), "tol": (_NUM,),
    "svd": (_STR,),
    "center": (_BOOL,), "whiten": (_NUM, _BOOL), "loss_tol": (_NUM,), "damping": (_NUM,),
    "svd_oversampling": (_INT,), "svd_power_iter": (_INT,), "seed": (_INT,), "device": (_STR,),
    "dtype": (_STR,), "verify": (_STR, _INT), "memory_budget": (_INT, _STR), "verbose": (_BOOL,),
}
_CHECK = {
    _STR: lambda v: isinstance(v, str), _INT: is_int, _NUM: is_number,
    _BOOL: lambda v: isinstance(v, bool), _TABLE: lambda v: isinstance(v, dict),
}


def model_param_names() -> tuple[str, ...]:
    """The keyword arguments of ``UniCon(...)``: the valid keys of ``[model]``."""
    sig = inspect.signature(UniCon.__init__)
    return tuple(p for p in sig.parameters if p != "self")


def model_kwargs(table: dict) -> tuple[dict, list[str]]:
    """UniCon keyword arguments from the ``[model]`` table, and the problems found.

    Parameters
    ----------
    table : dict
        The parsed ``[model]`` table (option name to TOML value).

    Returns
    -------
    kwargs : dict
        The well-typed options, converted (kernel and loss tables to objects, sizes to
        bytes, ``whiten = false`` to None); the others are left out.
    errors : list of str
        One ``"[model] ..."`` line per unknown key and per value of the wrong type or form.
    """
    errors = []
    valid = model_param_names()
    errors += unknown_keys("model", table, valid)
    kwargs = {}
    for key, value in table.items():
        if key not in valid:
            continue
        types = MODEL_TYPES.get(key)
        if types is not None and not any(_CHECK[t](value) for t in types):
            errors.append(f"[model] {key} must be {' or '.join(('a ' if t != _INT else 'an ') + t for t in types)}, "
                          f"got {value!r} ({type_name(value)})")
            continue
        try:
            if key in ("kernel", "kernel_x", "kernel_y") and isinstance(value, dict):
                spec = dict(value)
                if not isinstance(spec.get("name"), str):
                    raise ValueError('needs a string key "name", e.g. {name = "rbf", bandwidth = 2.0}')
                value = get_kernel(spec.pop("name"), **spec)
            elif key in ("kernel", "kernel_x", "kernel_y"):
                get_kernel(value)
            elif key == "loss" and isinstance(value, dict):
                spec = dict(value)
                if not isinstance(spec.get("name"), str):
                    raise ValueError('needs a string key "name", e.g. {name = "sigmoid", bias = -10.0}')
                # the loss object carries τ and ν; a bad one is reported under its own key, so
                # the table is checked with the default instead of failing a second time here
                shared = {k: table[k] if k in table and option_error(k, table[k]) is None else getattr(UniCon(), k)
                          for k in ("temperature", "nu")}
                value = get_loss(spec.pop("name"), **shared, **spec)
            elif key == "memory_budget":
                value = parse_bytes(value)
            elif key == "whiten" and isinstance(value, bool):
                if value:
                    raise ValueError("is a ridge > 0 (e.g. 1e-3), or false for no whitening")
                value = None  # TOML has no null
        except (ValueError, TypeError) as exc:
            errors.append(f"[model] {key}: {exc}")
            continue
        kwargs[key] = value
    return kwargs, errors


def option_error(key: str, value) -> str | None:
    """UniCon's own validation of the one option ``key``, the others at their defaults."""
    try:
        UniCon(**{key: value}).validate_params()
    except (ValueError, TypeError) as exc:
        return f"[model] {exc}"
    return None


def check_model(kwargs: dict) -> list[str]:
    """Construct UniCon and run its own parameter validation (no data involved).

    ``validate_params`` stops at its first problem, so when it fails each option is
    validated on its own (the others at their defaults, which are valid) to report every
    bad one.  An error that no option shows alone is a constraint between options (e.g. a
    temperature the chosen loss refuses) and is reported as the joint check gave it.
    Fitting from a pair store also rules out landmark selections that need every row.
    """
    try:
        model = UniCon(**kwargs)
        _, kernels, _, _ = model.validate_params()
    except (ValueError, TypeError) as exc:
        alone = [e for e in (option_error(k, v) for k, v in kwargs.items()) if e is not None]
        return alone or [f"[model] {exc}"]
    nystroem = model.n_landmarks is not None or any(k.name != "linear" for k in kernels)
    if nystroem and model.landmarks != "uniform":
        return [f"[model] landmarks = {model.landmarks!r} needs every row in memory; a job fits from a pair "
                "store, which supports landmarks = 'uniform'"]
    return []


def check_model_against_store(kwargs: dict, info: StoreInfo) -> list[str]:
    """The bounds that need both the options and the store's schema."""
    defaults = UniCon()
    opt = {k: kwargs.get(k, getattr(defaults, k)) for k in ("rank", "kernel", "kernel_x", "kernel_y", "n_landmarks")}
    errors = []
    n_landmarks = opt["n_landmarks"]
    if n_landmarks is not None and n_landmarks > info.n_rows:
        errors.append(f"[model] n_landmarks = {n_landmarks} exceeds the {info.n_rows} rows of the store {info.path}")
        return errors
    bounds = []
    for side, dim in (("x", info.dim_x), ("y", info.dim_y)):
        kernel = opt[f"kernel_{side}"] if opt[f"kernel_{side}"] is not None else opt["kernel"]
        m, why = feature_bound(kernel, n_landmarks, dim, info.n_rows)
        bounds.append((m, side, why))
    m, side, why = min(bounds)
    if opt["rank"] > m:
        errors.append(f"[model] rank = {opt['rank']} exceeds the {m} features of view {side}: {why}")
    return errors


def feature_bound(kernel, n_landmarks, dim: int, n: int) -> tuple[int, str]:
    """An upper bound of one view's feature count m, and why."""
    k = get_kernel(kernel)
    if isinstance(k, Linear):
        if n_landmarks is None:
            return dim, f"the store's dimension {dim} (linear kernel)"
        return min(dim, n_landmarks), f"min(dimension {dim}, n_landmarks {n_landmarks})"
    if n_landmarks is None:
        m = min(n, DEFAULT_LANDMARKS)
        return m, f"the default {m} Nyström landmarks"
    return n_landmarks, f"n_landmarks {n_landmarks}"
