"""Paired feature rows on disk: :class:`PairStore`, a Zarr v3 group with arrays ``x``, ``y``
and optional ``groups``, ``labels``.

``x`` (n, dim_x) and ``y`` (n, dim_y) hold the features of the two sides, ``groups`` (n,)
which rows are positives of each other and ``labels`` (n,) a class per row (for
evaluation and zero-shot classification); the row chunks are the shards that streaming
passes and workers read.  The pieces live next to this module:

* :mod:`~unicon_dist.data.store_format` -- the schema, dtypes and their casts
  (:data:`~unicon_dist.data.store_format.STORE_DTYPES`, :func:`cast_to_storage`,
  :func:`storage_itemsize`), chunk layout (:func:`default_chunk_rows`);
* :mod:`~unicon_dist.data.store_lock` -- writer exclusion (``flock`` on
  ``<store>/.writer.lock``, the holder's description, stale temporaries);
* :mod:`~unicon_dist.data.store_read` -- chunk-checked reads (:class:`ChunkError`);
* :mod:`~unicon_dist.data.store_aux` -- auxiliary arrays (``put_array``, ``get_array``).

Commit protocol.  ``append`` validates everything first, writes the new rows past
``n_rows`` (growing the arrays as needed), and only then rewrites the group attributes
with the new ``n_rows``.  Every Zarr object is written with write-to-temporary-then-rename
by ``zarr.storage.LocalStore``, so a chunk holding committed rows is replaced whole or not
at all, and the attribute update is the single commit point.  Readers only ever see rows
below ``n_rows``; an interrupted append leaves extra physical rows that the next append
overwrites.

Writers.  Every write holds the writer lock from start to commit
(:mod:`~unicon_dist.data.store_lock`), so writers from any number of processes and
handles run one after another and never lose or mix committed rows; under the lock a
writer re-reads the committed state, and at the commit point it checks that no process
wrote without the lock (:class:`ConcurrentWriteError`).  A writer that cannot get the lock
within ``lock_timeout`` seconds raises :class:`StoreLockedError` naming the holder.  The
store is a local or POSIX-mounted directory (on which ``flock`` works between clients):
object stores (S3, GCS) are not supported by this class.  Readers (``open(mode="r")``,
``read``, ``iter_blocks``, ...) take no lock and never block; they see the rows committed
when the handle was opened or last :meth:`PairStore.refresh`-ed, never a partial append.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import numpy as np
import zarr

from .allocator import limit_malloc_arenas
from .store_aux import AuxArraysMixin
from .store_format import (
    BF16_NAN_BITS, FORMAT, IDENTITY_ATTRS, SCHEMA_VERSION, STORE_DTYPES, WRITE_CONFIG, bad_rows, bf16_bits,
    cast_to_storage, check_int_rows, check_label_names, default_chunk_rows, is_pair_store, open_group,
    positive_int, rows_text, storage_itemsize, timestamp,
)
from .store_lock import (
    DEFAULT_LOCK_TIMEOUT, LOCK_FILE, ConcurrentWriteError, StoreLockedError, WriterLock, check_lock_timeout,
    remove_partials,
)
from .store_read import ChunkError, StoreReadsMixin

limit_malloc_arenas()  # before Zarr's decoding threads exist (see unicon_dist.data.allocator)

__all__ = ["PairStore", "StoreLockedError", "ConcurrentWriteError", "ChunkError", "default_chunk_rows",
           "cast_to_storage", "storage_itemsize", "LOCK_FILE", "DEFAULT_LOCK_TIMEOUT"]


class PairStore(StoreReadsMixin, AuxArraysMixin):
    """Append-only Zarr v3 store of paired rows (x_i, y_i[, group_i]).

    Build with :meth:`create` or :meth:`open`, not the constructor.  The readers come
    from :class:`~unicon_dist.data.store_read.StoreReadsMixin`, the auxiliary arrays from
    :class:`~unicon_dist.data.store_aux.AuxArraysMixin`; writing, and the lock and commit
    protocol every write follows, are here.

    Writes are serialised by an advisory ``flock`` on ``<store>/.writer.lock`` held from
    start to commit (see :mod:`~unicon_dist.data.store_lock`): concurrent writers in any
    processes, and stale handles, append after each other's committed rows and never
    lose or mix them.
    A writer that cannot get the lock within ``lock_timeout`` seconds raises
    :class:`StoreLockedError` naming the holder.  This needs a local directory, or a
    shared POSIX file system on which ``flock`` works across clients (NFS; Lustre with
    the ``flock`` mount option); object stores are not supported.  Readers take no lock:
    a handle sees the rows committed when it was opened or last :meth:`refresh`-ed.

    Attributes
    ----------
    path : pathlib.Path
        The store directory.
    mode : {"r", "r+"}
        Read-only, or open for writing.
    lock_timeout : float
        Seconds a write waits for the writer lock (may be changed on the handle).

    Examples
    --------
    >>> store = PairStore.create("pairs.zarr", 512, 768)           # doctest: +SKIP
    >>> store.append(x, y, source="batch-0")                        # doctest: +SKIP
    (0, 1000)
    >>> x, y, groups = PairStore.open("pairs.zarr").read(slice(0, 10))  # doctest: +SKIP
    """

    def __init__(self, path, group, mode: str, lock_timeout: float = DEFAULT_LOCK_TIMEOUT, *, arrays=None):
        self.path = Path(path)
        self.mode = mode
        self.lock_timeout = check_lock_timeout(lock_timeout)
        self._lock = None  # the WriterLock while this handle writes
        self._thread_lock = threading.RLock()  # threads sharing this handle take turns
        self._swept = False  # whether this handle has removed stray temporaries yet
        if arrays is None:
            self._load(group, group.attrs.asdict())
        else:  # check_store's read-only view of a possibly damaged store: it reports the layout itself
            self._group, self._attrs, self._arrays = group, group.attrs.asdict(), dict(arrays)

    def _load(self, group, attrs: dict) -> None:
        """Adopt ``group`` and its attributes; check the row arrays cover ``n_rows``."""
        self._group = group
        self._attrs = attrs
        self._arrays = {}
        for name, tail in (("x", (self.dim_x,)), ("y", (self.dim_y,)), ("groups", ()), ("labels", ())):
            if (name == "groups" and not self.has_groups) or (name == "labels" and not self.has_labels):
                continue
            if name not in group:
                raise ValueError(f"pair store {self.path}: array {name!r} is missing")
            arr = self._arrays[name] = group[name].with_config(WRITE_CONFIG)
            if tuple(arr.shape[1:]) != tail or arr.shape[0] < len(self):
                raise ValueError(f"pair store {self.path}: array {name!r} has shape {arr.shape}, "
                                 f"expected ({len(self)} or more{''.join(f', {t}' for t in tail)})")

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, path, dim_x: int, dim_y: int, *, dtype="float32", groups: bool = False,
               chunk_rows: int | None = None, provenance: dict | None = None,
               overwrite: bool = False, labels: bool = False,
               label_names: list[str] | None = None,
               lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> "PairStore":
        """Create an empty store at the local directory ``path``.

        Parameters
        ----------
        path : str or Path
            Directory of the Zarr v3 group.
        dim_x, dim_y : int
            Feature dimensions of ``x`` and ``y``.
        dtype : {"float32", "float16", "float64", "bfloat16"}
            Storage dtype of both arrays.  Rows are rounded to it when appended and
            read back as that dtype (bfloat16: float32 arrays of the bfloat16 values,
            stored as their 16-bit patterns).
        groups : bool
            Whether rows carry an int64 group label (many-to-many positives).
        chunk_rows : int, optional
            Rows per chunk; default :func:`default_chunk_rows` (chunks of at least 1 MiB).
        provenance : dict, optional
            JSON-serialisable description of where the data came from.
        overwrite : bool
            Replace an existing pair store at ``path``.  A non-empty directory that is not
            a pair store is never replaced.
        labels : bool
            Whether rows carry an int64 class label (array ``labels``, read with
            :meth:`read_labels`), for evaluation and zero-shot classification.
        label_names : list of str, optional
            Class names; label ``k`` is ``label_names[k]``, and appended labels must then
            lie in ``[0, len(label_names))``.  Needs ``labels=True``; may also be set
            later with :meth:`set_label_names`.
        lock_timeout : float
            Seconds a write waits for the writer lock before raising
            :class:`StoreLockedError` (default 60).  Overwriting an existing store takes
            its lock first, so it never pulls a store from under a running writer.
        """
        lock_timeout = check_lock_timeout(lock_timeout)
        path = Path(path)
        dtype = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
        if dtype not in STORE_DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; expected one of {list(STORE_DTYPES)}")
        if chunk_rows is None and positive_int(dim_x) and positive_int(dim_y):
            chunk_rows = default_chunk_rows(dim_x, dim_y, dtype)
        for name, v in (("dim_x", dim_x), ("dim_y", dim_y), ("chunk_rows", chunk_rows)):
            if not positive_int(v):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if label_names is not None:
            label_names = check_label_names(label_names)
            if not labels:
                raise ValueError("label_names needs a store with labels=True")
        provenance = dict(provenance or {})
        try:
            json.dumps(provenance)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"provenance must be JSON-serialisable: {exc}") from None
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
            if not (path.is_dir() and (not any(path.iterdir()) or is_pair_store(path))):
                raise FileExistsError(f"refusing to overwrite {path}: it is not a pair store")
        attrs = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "dim_x": int(dim_x),
                 "dim_y": int(dim_y), "dtype": dtype, "has_groups": bool(groups),
                 "chunk_rows": int(chunk_rows), "n_rows": 0, "provenance": provenance,
                 "created": timestamp(), "appends": [], "has_labels": bool(labels),
                 "label_names": label_names, "aux": {}, "history": []}
        old = WriterLock.acquire(path, lock_timeout, "create (overwrite)") if path.exists() and \
            is_pair_store(path) else None
        try:
            group = zarr.open_group(path, mode="w", zarr_format=3, attributes=attrs)  # empties the directory
            # the old lock file went with it: lock the new store until its arrays exist (a
            # writer that waited on the old file notices it was removed and retries)
            new = WriterLock.acquire(path, lock_timeout, "create")
        finally:
            if old is not None:
                old.release(clean=True)
        ok = False
        try:
            zstd = zarr.codecs.ZstdCodec(level=3, checksum=True)
            for name, d in (("x", dim_x), ("y", dim_y)):
                bf16 = dtype == "bfloat16"
                group.create_array(name, shape=(0, int(d)), chunks=(int(chunk_rows), int(d)),
                                   dtype="uint16" if bf16 else dtype, fill_value=BF16_NAN_BITS if bf16 else np.nan,
                                   compressors=zstd, config=WRITE_CONFIG)
            for name, wanted in (("groups", groups), ("labels", labels)):
                if wanted:
                    group.create_array(name, shape=(0,), chunks=(int(chunk_rows),), dtype="int64",
                                       fill_value=0, compressors=zstd, config=WRITE_CONFIG)
            ok = True
        finally:
            new.release(clean=ok)
        return cls(path, group, "r+", lock_timeout)

    @classmethod
    def open(cls, path, mode: str = "r", *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> "PairStore":
        """Open an existing store, read-only (``"r"``) or for appending (``"r+"``).

        Opening takes no lock, in either mode; each write takes the writer lock, waiting
        at most ``lock_timeout`` seconds (default 60) before raising
        :class:`StoreLockedError`.
        """
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        lock_timeout = check_lock_timeout(lock_timeout)
        group, _ = open_group(Path(path), mode)
        return cls(path, group, mode, lock_timeout)

    def refresh(self) -> "PairStore":
        """Re-read the committed state from disk (to see another process's appends).

        Writes do this by themselves, under the writer lock; readers call it to see rows
        committed since the handle was opened.
        """
        with self._thread_lock:
            group, attrs = open_group(self.path, self.mode)
            self._load(group, attrs)
        return self

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return int(self._attrs["n_rows"])

    def __repr__(self) -> str:
        return (f"PairStore({str(self.path)!r}, n_rows={len(self)}, dim_x={self.dim_x}, "
                f"dim_y={self.dim_y}, dtype={self.dtype!r}, has_groups={self.has_groups}, "
                f"has_labels={self.has_labels})")

    dim_x = property(lambda self: int(self._attrs["dim_x"]), doc="Columns of ``x``.")
    dim_y = property(lambda self: int(self._attrs["dim_y"]), doc="Columns of ``y``.")
    dtype = property(lambda self: str(self._attrs["dtype"]), doc="Storage dtype name.")
    itemsize = property(lambda self: storage_itemsize(self.dtype), doc="Bytes per stored value.")
    has_groups = property(lambda self: bool(self._attrs["has_groups"]), doc="Whether rows carry group labels.")
    chunk_rows = property(lambda self: int(self._attrs["chunk_rows"]), doc="Rows per chunk (shard).")
    provenance = property(lambda self: dict(self._attrs["provenance"]), doc="Provenance given at creation.")
    attrs = property(lambda self: json.loads(json.dumps(self._attrs)), doc="Copy of all group attributes.")
    has_labels = property(lambda self: bool(self._attrs.get("has_labels", False)),
                          doc="Whether rows carry class labels (array ``labels``).")

    @property
    def label_names(self) -> list[str] | None:
        """Class names (label ``k`` is ``label_names[k]``), or None when not set."""
        names = self._attrs.get("label_names")
        return None if names is None else list(names)

    @property
    def history(self) -> list[dict]:
        """Records added with :meth:`add_history` (e.g. one per ingest run), oldest first."""
        return json.loads(json.dumps(self._attrs.get("history", [])))

    def _require_writable(self) -> None:
        if self.mode == "r":
            raise PermissionError(f"pair store {self.path} is open read-only; open it with mode='r+'")

    @contextlib.contextmanager
    def _writing(self, operation: str):
        """Hold the writer lock for the body, with the committed state re-read from disk.

        Re-entrant per handle (a write that calls another runs under the one lock); the
        lock is released when the body ends, normally or not.
        """
        self._require_writable()
        with self._thread_lock:
            if self._lock is not None:
                yield
                return
            lock = WriterLock.acquire(self.path, self.lock_timeout, operation)
            self._lock = lock
            clean = False
            try:
                if lock.unclean or not self._swept:
                    remove_partials(self.path)
                    self._swept = True
                self._reload_for_write()
                yield
                clean = True
            finally:
                self._lock = None
                lock.release(clean)

    def _reload_for_write(self) -> None:
        """Adopt the state on disk: attributes and the arrays' metadata.

        A zarr array caches its shape, so an array object from before another writer's
        append would ``resize`` the array back to the old length; reopening avoids that.
        """
        group, attrs = open_group(self.path, "r+")
        changed = [k for k in IDENTITY_ATTRS if attrs.get(k) != self._attrs.get(k)]
        if changed:
            raise ConcurrentWriteError(
                f"pair store {self.path} was re-created since this handle was opened ({', '.join(changed)} "
                f"changed: {', '.join(f'{k} {self._attrs.get(k)!r} -> {attrs.get(k)!r}' for k in changed)}); "
                "nothing was written: open it again")
        self._load(group, attrs)

    def _update_attrs(self, new: dict) -> None:
        """Merge ``new`` into the group attributes as they are on disk: the commit point.

        ``zarr.Group.update_attributes`` writes the handle's whole in-memory attribute
        document, so it is called on a group just read from disk, after checking that
        the attributes there are still the ones this write read under the lock.
        """
        with self._writing("update attributes"):
            group = zarr.open_group(self.path, mode="r+", zarr_format=3)
            disk = group.attrs.asdict()
            changed = sorted(k for k in disk.keys() | self._attrs.keys() if disk.get(k) != self._attrs.get(k))
            if changed:
                what = (f"n_rows on disk is {disk.get('n_rows')!r}, but this write started from "
                        f"{self._attrs.get('n_rows')!r}" if "n_rows" in changed else
                        f"attributes {changed} changed on disk")
                raise ConcurrentWriteError(
                    f"pair store {self.path}: {what} while this process held the writer lock: another "
                    "process wrote to the store without the lock (an older unicon_dist, or zarr directly). "
                    f"Nothing was committed; check the store with `unicon-dist check-store {self.path}`")
            group.update_attributes(new)
            self._group = group
            self._attrs = group.attrs.asdict()

    def set_label_names(self, names: list[str] | None) -> None:
        """Set (or with None, remove) the class names, in one atomic attribute update.

        The committed labels are checked first (chunk by chunk): every one must lie in
        ``[0, len(names))``.

        Raises
        ------
        ValueError
            If the store has no labels, or a committed label is out of range (the error
            names the rows).
        """
        self._require_writable()
        if names is not None:
            names = check_label_names(names)
            if not self.has_labels:
                raise ValueError(f"pair store {self.path} was created without labels; label_names needs labels")
        # under the lock, so that no append can commit a label outside the new names
        # between this check and the attribute update
        with self._writing("set_label_names"):
            if names is not None:
                k = len(names)
                shown, n_bad = [], 0
                for a in range(0, len(self), self.chunk_rows):  # chunk by chunk: O(chunk) memory
                    b = min(len(self), a + self.chunk_rows)
                    lab = self._read_array("labels", slice(a, b), np.arange(a, b), [a // self.chunk_rows])
                    bad = np.flatnonzero((lab < 0) | (lab >= k))
                    shown += (bad[:5 - len(shown)] + a).tolist()
                    n_bad += bad.size
                if n_bad:
                    raise ValueError(f"pair store {self.path}: committed labels outside [0, {k}) in rows "
                                     f"{', '.join(map(str, shown))}{f' and {n_bad - 5} more' if n_bad > 5 else ''};"
                                     f" cannot set {k} label_names")
            self._update_attrs({"label_names": names})

    def add_history(self, record: dict) -> None:
        """Append a JSON-serialisable record to :attr:`history` (one attribute update).

        Used by :func:`unicon_dist.data.ingest.ingest` to log each run: sources, sizes, time,
        command and rows written.  Does not change the committed rows.
        """
        self._require_writable()
        try:
            record = json.loads(json.dumps(dict(record)))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"history record must be a JSON-serialisable dict: {exc}") from None
        with self._writing("add_history"):  # the list as it is on disk, not this handle's copy
            self._update_attrs({"history": list(self._attrs.get("history", [])) + [record]})

    # ------------------------------------------------------------------ writing
    def append(self, x, y, groups=None, *, labels=None, source: str | None = None) -> tuple[int, int]:
        """Validate and append rows; returns the new committed row range ``(start, stop)``.

        Parameters
        ----------
        x : array-like of shape (n, dim_x)
        y : array-like of shape (n, dim_y)
            Numeric, bool included (stored as 0/1), integer or float; cast to the store
            dtype, and finite after that cast.
        groups : array-like of int, shape (n,), optional
            One group per row, iff the store has groups.
        labels : array-like of int, shape (n,), optional
            One class label per row, iff the store has labels; within
            ``[0, len(label_names))`` when :attr:`label_names` is set.
        source : str, optional
            Recorded in the append log (``attrs["appends"]``).

        Returns
        -------
        (start, stop) : tuple of int
            The rows this append committed.  ``start`` is the committed row count on
            disk when the append took the writer lock, so with other writers (or from a
            handle opened before their appends) it can be past this handle's ``len``.

        Raises
        ------
        TypeError, ValueError
            Bad input; nothing is written.
        StoreLockedError
            Another writer kept the lock for ``lock_timeout`` seconds; nothing written.
        ConcurrentWriteError
            The store changed on disk under the lock (a process wrote without it);
            nothing is committed.

        Notes
        -----
        All arrays are validated before the lock is taken, written past ``n_rows``, and
        committed together by one attribute update, all under the writer lock.
        """
        self._require_writable()
        offset = len(self)
        data = self._validate(x, y, groups, offset)
        n = data["x"].shape[0]
        data.update(self._validate_labels(labels, n, offset))
        if n == 0:
            self.refresh()
            return len(self), len(self)
        names = self.label_names
        with self._writing("append"):
            start = len(self)
            if labels is not None and self.label_names != names:  # set by another writer meanwhile
                data.update(self._validate_labels(labels, n, start))
            stop = start + n
            for name, arr in data.items():
                self._write(name, start, arr)
            log = list(self._attrs["appends"]) + [{"rows": [start, stop], "time": timestamp()}]
            if source is not None:
                log[-1]["source"] = str(source)
            self._update_attrs({"n_rows": stop, "appends": log})  # the commit point
        return start, stop

    def _write(self, name: str, start: int, data: np.ndarray) -> None:
        arr = self._arrays[name]
        if self.dtype == "bfloat16" and name in ("x", "y"):
            data = bf16_bits(data)
        stop = start + data.shape[0]
        if arr.shape[0] < stop:
            arr.resize((stop,) + tuple(arr.shape[1:]))
        arr[start:stop] = data

    def _validate(self, x, y, groups, offset: int) -> dict:
        out = {}
        for name, a, dim in (("x", x, self.dim_x), ("y", y, self.dim_y)):
            try:
                a = np.asarray(a)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{name} is not convertible to a numeric array: {exc}") from None
            if a.dtype.kind not in "biuf":  # bool as 0/1, like fit's arrays
                raise TypeError(f"{name} must be a numeric array castable to {self.dtype}, got dtype {a.dtype}")
            if a.ndim != 2:
                raise ValueError(f"{name} must be 2-D (n, {dim}), got shape {a.shape}")
            if a.shape[1] != dim:
                raise ValueError(f"{name} has {a.shape[1]} columns but the store's dim_{name} is {dim}")
            if a.dtype.kind == "f" and (bad := bad_rows(a)).size:
                raise ValueError(f"{name} has non-finite values in {rows_text(bad, offset)}")
            with np.errstate(over="ignore", invalid="ignore"):
                cast = cast_to_storage(a, self.dtype)
            if (bad := bad_rows(cast)).size:
                raise ValueError(f"{name} has values out of range for {self.dtype} in {rows_text(bad, offset)}")
            out[name] = cast
        if out["x"].shape[0] != out["y"].shape[0]:
            raise ValueError(f"mismatched number of rows: x has {out['x'].shape[0]}, y has {out['y'].shape[0]}")
        n = out["x"].shape[0]
        if self.has_groups != (groups is not None):
            raise ValueError(f"pair store {self.path} has groups: pass groups= with one label per row"
                             if self.has_groups else
                             f"pair store {self.path} was created without groups; do not pass groups=")
        if groups is not None:
            out["groups"] = check_int_rows("groups", groups, n)
        return out

    def _validate_labels(self, labels, n: int, offset: int) -> dict:
        if self.has_labels != (labels is not None):
            raise ValueError(f"pair store {self.path} has labels: pass labels= with one label per row"
                             if self.has_labels else
                             f"pair store {self.path} was created without labels; do not pass labels=")
        if labels is None:
            return {}
        lab = check_int_rows("labels", labels, n)
        names = self.label_names
        if names is not None and (bad := np.flatnonzero((lab < 0) | (lab >= len(names)))).size:
            raise ValueError(f"labels must lie in [0, {len(names)}) (the store has {len(names)} "
                             f"label_names); out of range in {rows_text(bad, offset)}")
        return {"labels": lab}
