"""Checkpoints of the fixed-point driver: one atomic .npz per fit, rewritten every iteration.

A checkpoint (format ``"unicon_dist.checkpoint/1"``) is a JSON header plus arrays, written
with :func:`unicon_dist.io.artifacts.atomic_save_npz` (temporary file, fsync, rename), so a
reader -- or a resumed fit after a crash -- sees the previous iteration's checkpoint or the
new one, never a torn file.  No pickle.

Header keys: ``format``, ``version``, ``fingerprint`` (what the fit was run on, see
below), ``iteration`` k (the last point evaluated), ``finished`` (converged, or k reached
``max_iter``), ``converged``, ``history``, ``initial_loss``, ``best`` (``value``, what the
iterate kept so far was chosen by -- its residual, or its criterion with ``loss_tol`` > 0 --
and its ``iteration``), ``svd_solver``, ``n_features``,
``n_inputs``, ``maps`` (the feature maps, as :func:`unicon_dist.io.model_files.maps_state`
writes them for a model file) and ``solver`` (the fixed-point policy's scalars and how
the next point was made, :class:`unicon_dist.solver.fixed_point.FixedPointState`).
Arrays: ``F1``, ``F2``, ``W`` of the next point W_{k+1} (of W_k when finished),
``best_F1``, ``best_F2``, ``best_W`` of the iterate kept, ``solver_*`` (the policy's
factor history) and the maps' landmarks and normalisations.

The fingerprint is an ordered mapping of named fields: every constructor option except
``verbose`` (JSON-normalised as in :meth:`UniCon.save`), then the data -- for a pair store
its resolved path, committed row count, dims, dtype and whether its groups are used; for
arrays the pair count, dims and a content digest of X, Y and groups.  A resumed fit must
match it field by field, so a checkpoint is never continued on other data or settings.

:class:`CheckpointRun` is one fit's checkpoint: opened (and, resuming, read and checked)
before the fit, written after every step.  It takes and gives plain arrays, tensors and
the feature maps of :mod:`unicon_dist.math`, never the estimator.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..version import __version__
from .artifacts import atomic_save_npz, load_npz, read_header
from .model_files import maps_from_state, maps_state

__all__ = [
    "FORMAT",
    "array_digest",
    "array_fingerprint",
    "store_fingerprint",
    "normalize",
    "first_difference",
    "check_fingerprint",
    "read_checkpoint_header",
    "load_checkpoint",
    "write_checkpoint",
    "CheckpointRun",
]

logger = logging.getLogger(__name__)

FORMAT = "unicon_dist.checkpoint/1"
# rows hashed by array_digest: enough to tell data sets apart, cheap for millions of rows
_DIGEST_ROWS = 4096
# header keys a resumed fit reads
_KEYS = ("fingerprint", "iteration", "finished", "converged", "history", "initial_loss", "best", "maps")
# a fit without resume refuses to replace a file it cannot read as a checkpoint, so only deleting it starts over
_HINT = "delete it to start the fit over without it"


def _as_numpy(A) -> np.ndarray:
    return A.detach().cpu().numpy() if isinstance(A, torch.Tensor) else np.asarray(A)


def array_digest(A, max_rows: int = _DIGEST_ROWS) -> str:
    """SHA-256 of an array's shape, dtype and an evenly strided sample of its rows.

    Parameters
    ----------
    A : ndarray or torch.Tensor
        Any shape; rows are indexed along the first axis.
    max_rows : int
        At most this many rows (always the first and the last) are hashed, so the
        digest of an n × d array costs O(max_rows · d), not O(n · d).

    Returns
    -------
    str
        ``"sha256:<hex>"``.
    """
    if isinstance(A, torch.Tensor):
        rows = A.shape[0] if A.ndim else 0
        idx = _sample_rows(rows, max_rows)
        sample = _as_numpy(A if idx is None else A[torch.as_tensor(idx, device=A.device)])
        dtype, shape = str(A.dtype).removeprefix("torch."), tuple(A.shape)
    else:
        A = np.asarray(A)
        idx = _sample_rows(A.shape[0] if A.ndim else 0, max_rows)
        sample = A if idx is None else A[idx]
        dtype, shape = A.dtype.name, A.shape
    h = hashlib.sha256(json.dumps({"shape": list(shape), "dtype": dtype}).encode())
    if sample.dtype.kind in "biuf":
        h.update(np.ascontiguousarray(sample).tobytes())
    else:  # object or string arrays: their bytes are pointers, hash the values instead
        h.update(repr(sample.tolist()).encode())
    return "sha256:" + h.hexdigest()


def _sample_rows(n: int, max_rows: int):
    if n <= max_rows:
        return None
    return np.unique(np.linspace(0, n - 1, max_rows).round().astype(np.int64))


def array_fingerprint(X, Y, groups) -> dict:
    """The data part of the fingerprint of an in-memory fit (X, Y already validated)."""
    return {
        "data": "arrays",
        "n_pairs": int(X.shape[0]),
        "dim_x": int(X.shape[1]),
        "dim_y": int(Y.shape[1]),
        "X": array_digest(X),
        "Y": array_digest(Y),
        # groups decide which pairs are positives, so all of them are hashed (n int64s)
        "groups": None if groups is None else array_digest(groups, max_rows=np.iinfo(np.int64).max),
    }


def store_fingerprint(path, n_rows: int, dim_x: int, dim_y: int, dtype: str, use_groups: bool) -> dict:
    """The data part of the fingerprint of a fit from a pair store.

    The store is append-only, so its resolved path and committed row count name the
    rows the fit saw; appending rows changes ``n_pairs``.
    """
    return {
        "data": "store",
        "store": str(Path(path).resolve()),
        "n_pairs": int(n_rows),
        "dim_x": int(dim_x),
        "dim_y": int(dim_y),
        "store_dtype": str(dtype),
        "groups": "store" if use_groups else None,
    }


def _json_default(o):
    if isinstance(o, (np.generic, torch.Tensor)) and getattr(o, "ndim", 0) == 0:
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def normalize(value):
    """``value`` as it reads back from a JSON header (tuples become lists, numpy scalars numbers)."""
    return json.loads(json.dumps(value, default=_json_default))


def first_difference(saved: dict, current: dict):
    """The first field (in ``current``'s order) whose value differs: (name, saved, current) or None."""
    for key, value in current.items():
        if key not in saved or saved[key] != value:
            return key, saved.get(key, "<missing>"), value
    for key in saved:
        if key not in current:
            return key, saved[key], "<missing>"
    return None


def check_fingerprint(path, header: dict, fingerprint: dict) -> None:
    """Raise ValueError naming the first field in which the checkpoint's fit differs from this one."""
    diff = first_difference(header.get("fingerprint", {}), normalize(fingerprint))
    if diff is not None:
        key, old, new = diff
        raise ValueError(
            f"checkpoint {path} was written by a different fit: {key} is {old!r} in the checkpoint but {new!r} "
            "now; resume with the same data and settings, or delete the checkpoint to start over"
        )


def read_checkpoint_header(path) -> dict:
    """The JSON header of a checkpoint, reading no arrays.

    Raises
    ------
    FileNotFoundError
        No such file.
    ArtifactError
        (a ValueError, :mod:`unicon_dist.io.artifacts`) naming the file: not a unicon_dist
        checkpoint (another artifact, a foreign file), or a damaged one -- then the
        message says that deleting it starts the fit over.
    """
    return read_header(path, kind="checkpoint", format=FORMAT, keys=_KEYS, hint=_HINT)


def load_checkpoint(path) -> tuple[dict, dict]:
    """(header, arrays) of a checkpoint written by :func:`write_checkpoint`.

    Raises as :func:`read_checkpoint_header` does, and also when an array is missing,
    unreadable, or holds NaN or Inf (a written checkpoint never does).
    """
    return load_npz(path, kind="checkpoint", format=FORMAT, keys=_KEYS, required=("F1", "F2", "W"), hint=_HINT)


def write_checkpoint(path, header: dict, arrays: dict) -> Path:
    """Write a checkpoint atomically (the previous one stays intact if this write fails)."""
    return atomic_save_npz(os.fspath(path), {**header, "format": FORMAT}, arrays)


class CheckpointRun:
    """The checkpoint of one fit: its file, the fingerprint it must match, the state resumed from.

    Parameters
    ----------
    path : Path
        The checkpoint file.
    fingerprint : dict
        What the fit is run on (options, then data; see the module's notes).

    Attributes
    ----------
    header, arrays : dict or None
        The checkpoint read by :meth:`resume` (None: none was read; the fit starts over).
    maps : dict or None
        {"x": map, "y": map}: the feature maps the checkpoint holds, on the fit's device.
    """

    def __init__(self, path: Path, fingerprint: dict):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.header = self.arrays = self.maps = None  # set by resume() when there is a state

    @classmethod
    def open(cls, path, fingerprint: dict, *, resume: bool, device=None) -> "CheckpointRun":
        """The checkpoint of a fit about to start, resumed from when ``resume`` and it exists.

        Raises
        ------
        ValueError
            ``path`` is a directory; or, resuming, the checkpoint belongs to another fit
            (naming the first field that differs) or is damaged; or, not resuming, the
            file there is no checkpoint (a saved model, say), which a fit never replaces.
        """
        run = cls(Path(path), fingerprint)
        if run.path.is_dir():
            raise ValueError(f"checkpoint {run.path} is a directory; pass the path of a file (e.g. fit.ckpt.npz)")
        if resume:
            run.resume(device)
        elif run.path.exists():
            try:  # an old checkpoint is replaced; any other file (a saved model, say) is not
                read_checkpoint_header(run.path)
            except ValueError as exc:
                raise ValueError(f"{exc}; refusing to replace it with a checkpoint") from None
        return run

    def resume(self, device) -> None:
        """Read the checkpoint, if there is one, after checking that it belongs to this fit."""
        if not self.path.exists():
            logger.info("no checkpoint at %s; fitting from scratch", self.path)
            return
        header, arrays = load_checkpoint(self.path)
        check_fingerprint(self.path, header, self.fingerprint)
        if header.get("version") != __version__:
            logger.warning("checkpoint %s was written by unicon_dist %s, this is %s; the resumed fit may differ "
                           "in round-off from an uninterrupted one", self.path, header.get("version"), __version__)
        state = "a finished fit" if header["finished"] else f"iteration {header['iteration']}"
        logger.info("resuming from checkpoint %s (%s)", self.path, state)
        self.header, self.arrays = header, arrays
        self.maps = maps_from_state(header["maps"], arrays, device)

    def fit_state(self, device, *, svd_solver: str, n_features, n_inputs, rank: int) -> dict:
        """The iteration state read back, checked against the sizes of the fit resuming it.

        Returns
        -------
        dict
            ``iteration`` k, ``finished``, ``F1``, ``F2``, ``W`` (tensors of step k on
            ``device``), ``best`` (value, iteration, F1, F2, W of the kept iterate),
            ``history``, ``converged``, ``stop_reason``, ``initial_loss``.

        Raises
        ------
        ValueError
            The checkpoint's solver, sizes or array shapes differ from the fit's.
        """
        h, a = self.header, self.arrays
        mx, my = n_features
        expected = {
            "svd_solver": (h.get("svd_solver"), svd_solver),
            "n_features": (h.get("n_features"), list(n_features)),
            "n_inputs": (h.get("n_inputs"), list(n_inputs)),
            "F1 shape": (a["F1"].shape if "F1" in a else None, (rank, mx)),
            "F2 shape": (a["F2"].shape if "F2" in a else None, (rank, my)),
            "W shape": (a["W"].shape if "W" in a else None, (mx, my)),
        }
        for key, (saved, now) in expected.items():
            if saved != now:
                raise ValueError(f"checkpoint {self.path} does not fit this model: {key} is {saved!r} there, "
                                 f"{now!r} here; delete it to start over")

        def tensor(name):
            return torch.as_tensor(np.ascontiguousarray(a[name]), device=device)

        k = int(h["iteration"])
        F1, F2, W = tensor("F1"), tensor("F2"), tensor("W")
        value, best_it = float(h["best"]["value"]), int(h["best"]["iteration"])
        best = (value, best_it, tensor("best_F1"), tensor("best_F2"), tensor("best_W"))
        return {"iteration": k, "finished": bool(h["finished"]), "F1": F1, "F2": F2, "W": W, "best": best,
                "history": [dict(entry) for entry in h["history"]], "converged": bool(h["converged"]),
                "stop_reason": h.get("stop_reason"), "initial_loss": float(h["initial_loss"]),
                "solver": dict(h.get("solver") or {}),
                "solver_arrays": {k[len("solver_"):]: np.ascontiguousarray(v) for k, v in a.items()
                                  if k.startswith("solver_")}}

    def write(self, iteration: int, F1, F2, W, best, *, finished: bool, converged: bool, history: list,
              initial_loss: float, stop_reason, svd_solver: str, n_features, n_inputs, maps,
              solver=({}, {})) -> None:
        """Write the state after ``iteration`` atomically (the previous checkpoint survives a failure).

        ``best`` is (value, iteration, F1, F2, W) of the kept iterate, value being what it
        was chosen by (its residual; its criterion with ``loss_tol`` > 0); ``maps`` the
        feature maps (map_x, map_y) of the fit; ``solver`` the fixed-point policy's state
        as (JSON header, arrays), the arrays stored under a ``solver_`` prefix.
        """
        map_specs, arrays = maps_state(*maps)
        arrays.update(F1=F1.cpu().numpy(), F2=F2.cpu().numpy(), W=W.cpu().numpy())
        arrays.update({f"solver_{k}": v for k, v in solver[1].items()})
        value, best_it = best[0], best[1]
        # F1, F2, W are the next point to evaluate, so the kept iterate is always its own arrays
        arrays.update(best_F1=best[2].cpu().numpy(), best_F2=best[3].cpu().numpy(), best_W=best[4].cpu().numpy())
        header = {
            "version": __version__,
            "fingerprint": normalize(self.fingerprint),
            "iteration": iteration,
            "finished": bool(finished),
            "converged": bool(converged),
            "history": history,
            "initial_loss": initial_loss,
            "best": {"value": value, "iteration": best_it},
            "stop_reason": stop_reason,
            "svd_solver": svd_solver,
            "n_features": list(n_features),
            "n_inputs": list(n_inputs),
            "maps": map_specs,
            "solver": solver[0],
        }
        write_checkpoint(self.path, header, arrays)
