"""Auxiliary arrays of a pair store: small side arrays, each replaced atomically.

Small per-store side arrays (e.g. ``label_embeddings_y``, one y-side vector per class)
live under ``aux/`` as ``aux/<name>-<random hex>``; the ``aux`` attribute maps each name
to its current path.  :meth:`AuxArraysMixin.put_array` writes a new array under a fresh
path and then makes it visible by rewriting that attribute (the store's commit point), so
a reader sees the old version or the new one, never a partial write; the replaced version
(and any orphan left by an interrupted put) is deleted afterwards.
"""

from __future__ import annotations

import json
import math
import re
import uuid

import numpy as np
import zarr

from .store_format import AUX_GROUP, DECODE_ERRORS, ROW_ARRAYS, WRITE_CONFIG, timestamp
from .store_read import chunk_key, keys_exist

__all__ = ["AuxArraysMixin"]

_AUX_NAME = re.compile(r"[a-z0-9_]+")
_AUX_CHUNK_BYTES = 4 * 2**20


class AuxArraysMixin:
    """The auxiliary-array methods of :class:`~unicon_dist.data.store.PairStore`.

    Uses the store's ``path``, ``_group``, ``_attrs``, ``_require_writable``, ``_writing``
    (the writer lock) and ``_update_attrs`` (the commit point).
    """

    def array_names(self) -> list[str]:
        """Names of the auxiliary arrays, sorted."""
        return sorted(self._attrs.get("aux", {}))

    def array_attrs(self, name: str) -> dict:
        """The ``attrs`` given to :meth:`put_array` for auxiliary array ``name``."""
        return dict(self._aux_entry(name).get("attrs", {}))

    def put_array(self, name: str, array, *, attrs: dict | None = None) -> None:
        """Store (or replace) a small auxiliary array, atomically.

        Parameters
        ----------
        name : str
            Lower-case letters, digits and underscores (``[a-z0-9_]+``), not one of the
            row arrays ``x``, ``y``, ``groups``, ``labels``; e.g. ``"label_embeddings_y"``
            (n_classes, dim_y), the y-side representation of each class for zero-shot.
        array : array-like of shape (n, ...)
            Numeric (bool, integer or float) with at least one dimension; float values
            must be finite.  Kept in its own dtype.
        attrs : dict, optional
            JSON-serialisable metadata, returned by :meth:`array_attrs`.

        Notes
        -----
        The data are written under a fresh path first; one update of the group's ``aux``
        attribute then makes them visible, so readers see the previous version or this
        one, never a mix.  The previous version is deleted after that commit.
        """
        self._require_writable()
        if not isinstance(name, str) or not _AUX_NAME.fullmatch(name):
            raise ValueError(f"auxiliary array name must match [a-z0-9_]+, got {name!r}")
        if name in ROW_ARRAYS or name == AUX_GROUP:
            raise ValueError(f"auxiliary array name {name!r} clashes with the store's own arrays "
                             f"{list(ROW_ARRAYS)}")
        a = np.asarray(array)
        if a.dtype.kind not in "biuf":
            raise TypeError(f"auxiliary array {name!r} must be numeric (bool, int or float), got dtype {a.dtype}")
        if a.ndim < 1:
            raise ValueError(f"auxiliary array {name!r} must have at least one dimension, got a scalar")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = np.flatnonzero(~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1))
            raise ValueError(f"auxiliary array {name!r} has non-finite values in rows {bad[:5].tolist()}"
                             f"{f' and {bad.size - 5} more' if bad.size > 5 else ''}")
        try:
            attrs = json.loads(json.dumps(dict(attrs or {})))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"attrs of auxiliary array {name!r} must be JSON-serialisable: {exc}") from None
        with self._writing("put_array"):
            # the registry as on disk: another writer's arrays are neither orphans nor dropped
            registry = dict(self._attrs.get("aux", {}))
            aux = self._group.require_group(AUX_GROUP)
            live = {e["path"].split("/", 1)[1] for e in registry.values()}
            for orphan in set(aux.array_keys()) - live:  # left by an interrupted put_array
                del aux[orphan]
            node = f"{name}-{uuid.uuid4().hex[:12]}"
            row_bytes = max(1, a.dtype.itemsize * math.prod(a.shape[1:]))
            chunks = (max(1, min(a.shape[0], _AUX_CHUNK_BYTES // row_bytes)),) + tuple(max(1, d) for d in a.shape[1:])
            arr = aux.create_array(node, shape=a.shape, chunks=chunks, dtype=a.dtype,
                                   fill_value=np.nan if a.dtype.kind == "f" else 0,
                                   compressors=zarr.codecs.ZstdCodec(level=3, checksum=True), config=WRITE_CONFIG)
            if a.size:
                arr[...] = a
            old = registry.get(name)
            registry[name] = {"path": f"{AUX_GROUP}/{node}", "shape": list(a.shape), "dtype": a.dtype.name,
                              "attrs": attrs, "time": timestamp()}
            self._update_attrs({"aux": registry})  # the commit point
            if old is not None:
                self._delete_node(old["path"])

    def get_array(self, name: str) -> np.ndarray:
        """Read auxiliary array ``name`` (stored by :meth:`put_array`).

        Raises
        ------
        KeyError
            If there is no such array (the message lists the ones there are).
        ValueError
            If its data are missing or corrupt on disk.
        """
        entry = self._aux_entry(name)
        where = f"pair store {self.path}: auxiliary array {name!r} ({entry['path']})"
        try:
            arr = self._group[entry["path"]]
        except KeyError:
            raise ValueError(f"{where} is missing") from None
        if list(arr.shape) != list(entry["shape"]):
            raise ValueError(f"{where} has shape {arr.shape}, the registry says {tuple(entry['shape'])}")
        if arr.size:
            n_chunks = -(-arr.shape[0] // arr.chunks[0])
            keys = [chunk_key(arr, c) for c in range(n_chunks)]
            found = keys_exist(arr.store_path.store, keys)
            if not all(found):
                raise ValueError(f"{where}: chunk file {keys[found.index(False)]!r} not found")
        try:
            out = arr[...]
        except DECODE_ERRORS as exc:
            raise ValueError(f"{where} is corrupt: {exc}") from exc
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            raise ValueError(f"{where} holds non-finite values (a chunk is damaged)")
        return out

    def delete_array(self, name: str) -> None:
        """Remove auxiliary array ``name`` (unregistered first, then its data deleted)."""
        with self._writing("delete_array"):
            entry = self._aux_entry(name)  # the registry as on disk
            registry = dict(self._attrs.get("aux", {}))
            del registry[name]
            self._update_attrs({"aux": registry})
            self._delete_node(entry["path"])

    def _aux_entry(self, name: str) -> dict:
        registry = self._attrs.get("aux", {})
        if name not in registry:
            raise KeyError(f"pair store {self.path} has no auxiliary array {name!r}; "
                           f"it has {sorted(registry) or 'none'}")
        return registry[name]

    def _delete_node(self, path: str) -> None:
        parent, _, node = path.rpartition("/")
        grp = self._group[parent]
        if node in grp:
            del grp[node]
