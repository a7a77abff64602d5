"""Paired feature rows on disk: a Zarr v3 group with arrays ``x``, ``y`` and optional ``groups``, ``labels``.

Layout: ``x`` (n, dim_x) and ``y`` (n, dim_y) in one float dtype, ``groups`` (n,) int64
(which rows are positives of each other) and ``labels`` (n,) int64 (a class per row, for
evaluation and zero-shot classification), all chunked by rows only (one chunk =
``chunk_rows`` full rows, zstd with a frame checksum).  The chunks are the shards that
streaming passes and workers read.  The group attributes hold the schema (format,
schema_version, dims, dtype, chunk_rows, has_groups, has_labels), ``label_names``,
provenance, the append log, the ingest history, the registry of auxiliary arrays and
``n_rows``, the committed row count.  Stores written before labels and auxiliary arrays
existed lack those attributes and read as having neither.

Auxiliary arrays.  Small per-store side arrays (e.g. ``label_embeddings_y``, one y-side
vector per class) live under ``aux/`` as ``aux/<name>-<random hex>``; the ``aux``
attribute maps each name to its current path.  :meth:`PairStore.put_array` writes a new
array under a fresh path and then makes it visible by rewriting that attribute, so a
reader sees the old version or the new one, never a partial write; the replaced version
(and any orphan left by an interrupted put) is deleted afterwards.

Commit protocol.  ``append`` validates everything first, writes the new rows past
``n_rows`` (growing the arrays as needed), and only then rewrites the group attributes
with the new ``n_rows``.  Every Zarr object is written with write-to-temporary-then-rename
by ``zarr.storage.LocalStore``, so a chunk holding committed rows is replaced whole or not
at all, and the attribute update is the single commit point.  Readers only ever see rows
below ``n_rows``; an interrupted append leaves extra physical rows that the next append
overwrites.

Writers.  Every write (``append``, ``put_array``, ``delete_array``, ``set_label_names``,
``add_history``, and ``create(overwrite=True)`` of an existing store) holds an exclusive
advisory lock, ``fcntl.flock`` on ``<store>/.writer.lock``, from start to commit, so
writers from any number of processes and handles run one after another and never lose
or mix committed rows:

* The lock belongs to an open file description: two handles in one process exclude each
  other too, and the kernel drops the lock when its holder dies, even by SIGKILL.
* A writer waits at most ``lock_timeout`` seconds (``open``/``create`` keyword, default
  60), then raises :class:`StoreLockedError` (a ``TimeoutError``) naming the holder: the
  holder writes its pid, host, start time, operation and ``sys.argv`` into the lock file.
* Under the lock a writer first re-reads the committed state (the attributes and the
  arrays' shapes) from disk, so a handle opened long ago appends after the rows others
  committed since.  Attribute updates are merged into the attributes as they are on disk.
* At the commit point it checks that the attributes on disk are still those it read
  under the lock; if not, some process wrote without the lock (an older version, or
  zarr directly), and it raises :class:`ConcurrentWriteError` without committing.
* Zarr's temporaries (``*.<32 hex digits>.partial``) that a killed write left behind are
  removed by the next writer, under the lock, where no other write can be in flight: by
  each handle at its first write, and by any writer that finds the previous one died or
  failed (its description still in the lock file).

This holds on one host, and across hosts on a shared POSIX file system where ``flock``
works between clients: Linux NFS clients emulate ``flock`` with byte-range (NLM/NFSv4)
locks; some cluster file systems need it enabled (Lustre: the ``flock`` mount option;
without it ``flock`` fails with an error, or with ``localflock`` it excludes one client
only).  The store is a local or POSIX-mounted directory: object stores (S3, GCS) are not
supported by this class.  Readers (``open(mode="r")``, ``read``, ``iter_blocks``, ...)
take no lock and never block; they see the rows committed when the handle was opened or
last :meth:`PairStore.refresh`-ed, never a partial append.

Missing chunks.  Zarr returns the fill value for a chunk file that does not exist, so a
deleted chunk would read back silently.  The arrays are written with
``write_empty_chunks=True`` (so every chunk below ``n_rows`` exists on disk, even an
all-zero one), and each read first asks the store that the chunk keys it needs exist.
The float arrays also use NaN as fill value and reads check finiteness (append never
stores non-finite values), which catches a chunk lost between that check and the read.
Corrupt chunks fail zstd decoding (the frame checksum catches flipped bytes); the error
is re-raised naming the array, the chunk key and its row range.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from .allocator import limit_malloc_arenas

limit_malloc_arenas()  # before Zarr's decoding threads exist (see unicon_dist.data.allocator)

__all__ = ["PairStore", "StoreLockedError", "ConcurrentWriteError", "ChunkError", "default_chunk_rows",
           "cast_to_storage", "storage_itemsize", "LOCK_FILE", "DEFAULT_LOCK_TIMEOUT"]

log = logging.getLogger(__name__)

FORMAT = "unicon_dist.pairstore"
SCHEMA_VERSION = 1
STORE_DTYPES = _DTYPES = ("float32", "float16", "float64", "bfloat16")
# bfloat16 has no numpy dtype: its arrays hold the 16-bit patterns as uint16 (bits 16-31 of
# the float32 of the same value), and reads decode them to float32, which is exact
_BF16_NAN_BITS = 0x7FC0
_MIN_CHUNK_BYTES = 2**20
_WRITE_CONFIG = {"write_empty_chunks": True}
# what decoding a damaged chunk raises: numcodecs zstd -> RuntimeError, bad sizes -> ValueError
_DECODE_ERRORS = (RuntimeError, ValueError, OSError)
_ROW_ARRAYS = ("x", "y", "groups", "labels")
_AUX_NAME = re.compile(r"[a-z0-9_]+")
_AUX_GROUP = "aux"
_AUX_CHUNK_BYTES = 4 * 2**20
LOCK_FILE = ".writer.lock"
DEFAULT_LOCK_TIMEOUT = 60.0
# zarr.storage.LocalStore writes key K through K.with_suffix(f".{uuid4().hex}.partial")
# (zarr/storage/_local.py, _atomic_write); nothing else in a store ends like this
_PARTIAL = re.compile(r".+\.[0-9a-f]{32}\.partial")
# attributes that identify a store; a change means it was re-created under the handle
_IDENTITY = ("created", "dim_x", "dim_y", "dtype", "chunk_rows", "has_groups", "has_labels")


class StoreLockedError(TimeoutError):
    """Another writer held a pair store's writer lock for longer than ``lock_timeout``.

    Attributes
    ----------
    path : pathlib.Path
        The store.
    holder : dict or None
        What the holder wrote into the lock file when it took the lock: ``pid``,
        ``host``, ``acquired`` (ISO time, UTC), ``operation`` and ``argv``; None when
        it has not written one (yet) or it cannot be read.
    timeout : float
        Seconds waited.
    """

    def __init__(self, message: str, *, path: Path, holder: dict | None, timeout: float):
        super().__init__(message)
        self.path, self.holder, self.timeout = path, holder, timeout


class ConcurrentWriteError(RuntimeError):
    """A write found the store changed under the writer lock, and committed nothing.

    Only a process that wrote without the lock (an older unicon_dist, zarr directly) or
    one that re-created the store can cause this.
    """


class ChunkError(ValueError):
    """A chunk of a row array below ``n_rows`` is missing, undecodable or non-finite.

    Attributes
    ----------
    array : str
        ``"x"``, ``"y"``, ``"groups"`` or ``"labels"``.
    chunk : int
        Chunk index along the rows.
    key : str
        Its store key, e.g. ``"x/c/3/0"``.
    rows : tuple of int
        First and last committed row it holds.
    reason : {"missing", "corrupt", "non-finite"}
    detail : str
        What was found (e.g. the decoder's error).
    """

    def __init__(self, message: str, *, array: str, chunk: int, key: str, rows: tuple[int, int], reason: str,
                 detail: str):
        super().__init__(message)
        self.array, self.chunk, self.key, self.rows = array, chunk, key, rows
        self.reason, self.detail = reason, detail


def _lock_holder(path: Path) -> dict | None:
    """The description the lock's holder wrote (reopened by path: on NFS a fresh open
    revalidates the cached data)."""
    try:
        text = path.read_text(encoding="utf-8")
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe_holder(holder: dict | None) -> str:
    if holder is None:
        return ("by a process that has not described itself (one that took the lock a moment ago, "
                "or a tool other than unicon_dist)")
    since = holder.get("acquired", "?")
    held = holder.get("acquired_unix")
    held = f", {time.time() - held:.0f} s ago" if isinstance(held, (int, float)) else ""
    argv = holder.get("argv")
    argv = " ".join(map(str, argv)) if isinstance(argv, list) else "?"
    return (f"by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {since}{held} "
            f"(operation: {holder.get('operation', '?')}; command: {argv})")


class _WriterLock:
    """An exclusive ``flock`` on ``<store>/.writer.lock``, owned by one open file description.

    ``unclean`` is true when the previous holder did not release the lock normally (it
    died, or its write raised): its description was still in the file.
    """

    def __init__(self, fd: int, path: Path, unclean: bool, writable: bool):
        self.fd, self.path, self.unclean, self._writable = fd, path, unclean, writable

    @classmethod
    def acquire(cls, store: Path, timeout: float, operation: str) -> "_WriterLock":
        path = store / LOCK_FILE
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd, writable = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666), True
            except PermissionError:
                # a lock file created by another user: flock needs no write access on a
                # local file system (NFS does, and then flock itself fails below)
                fd, writable = os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
            try:
                try:
                    got = _flock_exclusive(fd, max(0.0, deadline - time.monotonic()))
                except OSError as exc:
                    fd = None  # closed by _flock_exclusive
                    if exc.errno == errno.EBADF and not writable:
                        raise OSError(exc.errno, f"pair store {store}: cannot take the writer lock {path}: "
                                      "this user may not write the lock file, and this file system needs "
                                      "write access for an exclusive lock (make it group-writable)") from exc
                    if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.EINVAL):
                        raise OSError(exc.errno, f"pair store {store}: cannot take the writer lock {path} "
                                      f"({exc.strerror}): the file system does not support flock between "
                                      "processes (NFS needs a lock manager; Lustre needs the 'flock' mount "
                                      "option)") from exc
                    raise
                except BaseException:
                    fd = None  # closed by _flock_exclusive, or by its waiting thread
                    raise
                if not got:
                    fd = None  # likewise
                    holder = _lock_holder(path)
                    raise StoreLockedError(
                        f"pair store {store}: the writer lock {path} is held {_describe_holder(holder)}; "
                        f"gave up after waiting {timeout:g} s (lock_timeout). Wait for that writer to "
                        f"finish, or open the store with a longer lock_timeout", path=store,
                        holder=holder, timeout=timeout)
                # the file may have been removed (the store re-created) while we waited:
                # a lock on an unlinked file excludes nobody, so start again on the new one
                if not _same_file(fd, path):
                    os.close(fd)
                    continue
                previous = os.pread(fd, 1 << 16, 0)
                if writable:
                    now = time.time()
                    me = {"pid": os.getpid(), "host": socket.gethostname(), "operation": operation,
                          "acquired": datetime.fromtimestamp(now, timezone.utc).isoformat(),
                          "acquired_unix": now, "argv": list(sys.argv)}
                    text = json.dumps(me).encode()
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, text, 0)
                return cls(fd, path, unclean=bool(previous.strip()), writable=writable)
            except BaseException:
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                raise

    def release(self, clean: bool) -> None:
        """Unlock; a clean release empties the holder's description first."""
        try:
            if clean and self._writable:
                os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)


def _flock_exclusive(fd: int, timeout: float) -> bool:
    """Take ``LOCK_EX`` on ``fd`` within ``timeout`` seconds; True when locked.

    Unless it returns True, ``fd`` is closed: here, or (after a timeout or an interrupt)
    by the waiting thread once its flock returns, which also drops what that got.

    flock keeps no queue of ``LOCK_NB`` tries, so polling would starve a waiter while
    another writer appends in a loop (it re-takes the lock within a millisecond of
    releasing it).  A blocking flock waits in the kernel's queue and wakes on release;
    it runs in a helper thread so that the wait can time out.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    except BaseException:
        os.close(fd)
        raise
    if timeout <= 0:
        os.close(fd)
        return False
    state = {"abandoned": False, "error": None}
    mutex, done = threading.Lock(), threading.Event()

    def wait():
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            state["error"] = exc
        with mutex:
            if state["abandoned"]:
                os.close(fd)
                return
            done.set()

    threading.Thread(target=wait, name=f"pair store lock wait (fd {fd})", daemon=True).start()
    try:
        done.wait(timeout)
    except BaseException:  # e.g. KeyboardInterrupt while waiting
        with mutex:
            if done.is_set():
                os.close(fd)
            else:
                state["abandoned"] = True
        raise
    with mutex:
        if not done.is_set():
            state["abandoned"] = True
            return False
    if state["error"] is not None:
        os.close(fd)
        raise state["error"]
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def _partial_files(root: Path) -> list[Path]:
    """Zarr's write temporaries (``*.<32 hex>.partial``) anywhere under the store ``root``."""
    found = []
    for dirpath, _, filenames in os.walk(root):
        found += [Path(dirpath) / f for f in filenames if _PARTIAL.fullmatch(f)]
    return sorted(found)


def _remove_partials(root: Path) -> None:
    """Delete write temporaries; only under the writer lock, when none can be in flight."""
    for f in _partial_files(root):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
            log.info("pair store %s: removed %s, left by an interrupted write", root, f.relative_to(root))


def storage_itemsize(dtype: str) -> int:
    """Bytes per stored value of a store dtype name (bfloat16 included)."""
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def cast_to_storage(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` rounded to the store dtype, as the values a read returns (bfloat16: float32
    arrays of bfloat16 values, rounded to nearest even by torch's cast)."""
    if dtype != "bfloat16":
        return a.astype(dtype, copy=False)
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return t.to(torch.bfloat16).to(torch.float32).numpy()


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """uint16 patterns of float32 values that are already bfloat16 (see cast_to_storage)."""
    return (np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def default_chunk_rows(dim_x: int, dim_y: int, dtype="float32") -> int:
    """Rows per chunk so that a chunk of the wider array holds at least 1 MiB.

    Rounded up to a multiple of 64, and at least 64.
    """
    itemsize = storage_itemsize(dtype)
    rows = math.ceil(_MIN_CHUNK_BYTES / (max(dim_x, dim_y) * itemsize))
    return max(64, -(-rows // 64) * 64)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _rows_text(rows: np.ndarray, offset: int) -> str:
    shown = rows[:5]
    more = f" and {rows.size - 5} more" if rows.size > 5 else ""
    glob = ", ".join(str(int(r) + offset) for r in shown)
    local = ", ".join(str(int(r)) for r in shown)
    return f"rows {glob}{more} (of this append: {local})"


def _bad_rows(a: np.ndarray) -> np.ndarray:
    return np.flatnonzero(~np.isfinite(a).all(axis=1))


def _check_label_names(names) -> list[str]:
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise TypeError(f"label_names must be a list of str, got {type(names).__name__}")
    names = list(names)
    bad = [i for i, v in enumerate(names) if not isinstance(v, str)]
    if bad:
        raise TypeError(f"label_names must be a list of str; entry {bad[0]} is {names[bad[0]]!r}")
    if not names:
        raise ValueError("label_names must name at least one class")
    return names


def _check_int_rows(name: str, a, n: int) -> np.ndarray:
    """One integer per row as int64, or a TypeError/ValueError naming ``name``."""
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integer labels, got dtype {a.dtype}")
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with one label per row ({n}), got shape {a.shape}")
    if a.dtype.kind == "u" and n and a.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} labels do not fit in int64")
    return a.astype(np.int64)


async def _exist_all(store, keys):
    return await asyncio.gather(*(store.exists(k) for k in keys))


class PairStore:
    """Append-only Zarr v3 store of paired rows (x_i, y_i[, group_i]).

    Build with :meth:`create` or :meth:`open`, not the constructor.

    Writes are serialised by an advisory ``flock`` on ``<store>/.writer.lock`` held from
    start to commit (see the module docstring): concurrent writers in any processes, and
    stale handles, append after each other's committed rows and never lose or mix them.
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
        self.lock_timeout = _check_timeout(lock_timeout)
        self._lock = None  # the _WriterLock while this handle writes
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
            arr = self._arrays[name] = group[name].with_config(_WRITE_CONFIG)
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
        lock_timeout = _check_timeout(lock_timeout)
        path = Path(path)
        dtype = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; expected one of {list(_DTYPES)}")
        if chunk_rows is None and _positive_int(dim_x) and _positive_int(dim_y):
            chunk_rows = default_chunk_rows(dim_x, dim_y, dtype)
        for name, v in (("dim_x", dim_x), ("dim_y", dim_y), ("chunk_rows", chunk_rows)):
            if not _positive_int(v):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if label_names is not None:
            label_names = _check_label_names(label_names)
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
            if not (path.is_dir() and (not any(path.iterdir()) or _is_pair_store(path))):
                raise FileExistsError(f"refusing to overwrite {path}: it is not a pair store")
        attrs = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "dim_x": int(dim_x),
                 "dim_y": int(dim_y), "dtype": dtype, "has_groups": bool(groups),
                 "chunk_rows": int(chunk_rows), "n_rows": 0, "provenance": provenance,
                 "created": _now(), "appends": [], "has_labels": bool(labels),
                 "label_names": label_names, "aux": {}, "history": []}
        old = _WriterLock.acquire(path, lock_timeout, "create (overwrite)") if path.exists() and \
            _is_pair_store(path) else None
        try:
            group = zarr.open_group(path, mode="w", zarr_format=3, attributes=attrs)  # empties the directory
            # the old lock file went with it: lock the new store until its arrays exist (a
            # writer that waited on the old file notices it was removed and retries)
            new = _WriterLock.acquire(path, lock_timeout, "create")
        finally:
            if old is not None:
                old.release(clean=True)
        ok = False
        try:
            zstd = zarr.codecs.ZstdCodec(level=3, checksum=True)
            for name, d in (("x", dim_x), ("y", dim_y)):
                bf16 = dtype == "bfloat16"
                group.create_array(name, shape=(0, int(d)), chunks=(int(chunk_rows), int(d)),
                                   dtype="uint16" if bf16 else dtype, fill_value=_BF16_NAN_BITS if bf16 else np.nan,
                                   compressors=zstd, config=_WRITE_CONFIG)
            for name, wanted in (("groups", groups), ("labels", labels)):
                if wanted:
                    group.create_array(name, shape=(0,), chunks=(int(chunk_rows),), dtype="int64",
                                       fill_value=0, compressors=zstd, config=_WRITE_CONFIG)
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
        lock_timeout = _check_timeout(lock_timeout)
        group, _ = _open_group(Path(path), mode)
        return cls(path, group, mode, lock_timeout)

    def refresh(self) -> "PairStore":
        """Re-read the committed state from disk (to see another process's appends).

        Writes do this by themselves, under the writer lock; readers call it to see rows
        committed since the handle was opened.
        """
        with self._thread_lock:
            group, attrs = _open_group(self.path, self.mode)
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

    def read_buffer_bytes(self) -> int:
        """Bytes a :meth:`read` holds beyond the rows it returns, at most.

        Zarr decodes up to ``async.concurrency`` chunks of one array at a time, each as
        its compressed bytes and its decoded chunk (the rows are then gathered from them).
        """
        concurrency = int(zarr.config.get("async.concurrency") or 1)
        chunk = self.chunk_rows * max(self.dim_x, self.dim_y) * self.itemsize
        return 2 * min(concurrency, -(-len(self) // self.chunk_rows) or 1) * chunk

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
            lock = _WriterLock.acquire(self.path, self.lock_timeout, operation)
            self._lock = lock
            clean = False
            try:
                if lock.unclean or not self._swept:
                    _remove_partials(self.path)
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
        group, attrs = _open_group(self.path, "r+")
        changed = [k for k in _IDENTITY if attrs.get(k) != self._attrs.get(k)]
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
            names = _check_label_names(names)
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
            log = list(self._attrs["appends"]) + [{"rows": [start, stop], "time": _now()}]
            if source is not None:
                log[-1]["source"] = str(source)
            self._update_attrs({"n_rows": stop, "appends": log})  # the commit point
        return start, stop

    def _write(self, name: str, start: int, data: np.ndarray) -> None:
        arr = self._arrays[name]
        if self.dtype == "bfloat16" and name in ("x", "y"):
            data = _bf16_bits(data)
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
            if a.dtype.kind == "f" and (bad := _bad_rows(a)).size:
                raise ValueError(f"{name} has non-finite values in {_rows_text(bad, offset)}")
            with np.errstate(over="ignore", invalid="ignore"):
                cast = cast_to_storage(a, self.dtype)
            if (bad := _bad_rows(cast)).size:
                raise ValueError(f"{name} has values out of range for {self.dtype} in {_rows_text(bad, offset)}")
            out[name] = cast
        if out["x"].shape[0] != out["y"].shape[0]:
            raise ValueError(f"mismatched number of rows: x has {out['x'].shape[0]}, y has {out['y'].shape[0]}")
        n = out["x"].shape[0]
        if self.has_groups != (groups is not None):
            raise ValueError(f"pair store {self.path} has groups: pass groups= with one label per row"
                             if self.has_groups else
                             f"pair store {self.path} was created without groups; do not pass groups=")
        if groups is not None:
            out["groups"] = _check_int_rows("groups", groups, n)
        return out

    def _validate_labels(self, labels, n: int, offset: int) -> dict:
        if self.has_labels != (labels is not None):
            raise ValueError(f"pair store {self.path} has labels: pass labels= with one label per row"
                             if self.has_labels else
                             f"pair store {self.path} was created without labels; do not pass labels=")
        if labels is None:
            return {}
        lab = _check_int_rows("labels", labels, n)
        names = self.label_names
        if names is not None and (bad := np.flatnonzero((lab < 0) | (lab >= len(names)))).size:
            raise ValueError(f"labels must lie in [0, {len(names)}) (the store has {len(names)} "
                             f"label_names); out of range in {_rows_text(bad, offset)}")
        return {"labels": lab}

    # ------------------------------------------------------------------ reading
    def read(self, rows=slice(None)):
        """Committed rows as numpy arrays ``(x, y, groups or None)``.

        ``rows`` is a slice, an integer, an integer array (any order, repeats and negative
        indices allowed) or a boolean mask of length ``len(self)``.
        """
        sel, scalar = self._selection(rows)
        out = self._read(sel)
        return tuple(None if a is None else (a[0] if scalar else a) for a in out)

    def read_labels(self, rows=slice(None)) -> np.ndarray:
        """Committed class labels (int64) of ``rows``, selected as in :meth:`read`.

        Raises
        ------
        ValueError
            If the store has no labels, or a labels chunk is missing or corrupt (the
            error names the chunk and its rows).
        """
        if not self.has_labels:
            raise ValueError(f"pair store {self.path} has no labels (created with labels=False)")
        sel, scalar = self._selection(rows)
        out = self._read(sel, names=("labels",))[0]
        return out[0] if scalar else out

    def read_groups(self, rows=slice(None)) -> np.ndarray:
        """Committed group labels (int64) of ``rows``, selected as in :meth:`read`.

        Reads only the ``groups`` array (an out-of-core fit needs all n labels, not the rows).
        """
        if not self.has_groups:
            raise ValueError(f"pair store {self.path} has no groups (created with groups=False)")
        sel, scalar = self._selection(rows)
        out = self._read(sel, names=("groups",))[0]
        return out[0] if scalar else out

    def _selection(self, rows):
        """Normalise ``rows`` to a contiguous slice or an array of non-negative indices."""
        n = len(self)
        scalar = False
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                return slice(start, max(start, stop)), False
            idx = np.arange(start, stop, step)
        else:
            idx = np.asarray(rows)
            scalar = idx.ndim == 0
            idx = idx.astype(np.int64) if idx.size == 0 else idx  # read([]) is fine
            if idx.dtype == bool:
                if idx.shape != (n,):
                    raise IndexError(f"boolean row mask has shape {idx.shape}, store has {n} rows")
                idx = np.flatnonzero(idx)
            if idx.dtype.kind not in "iu" or idx.ndim > 1:
                raise IndexError(f"rows must be a slice, an integer or a 1-D integer array, got {rows!r}")
            idx = np.atleast_1d(idx).astype(np.int64)
            if idx.size and (idx.min() < -n or idx.max() >= n):
                bad = idx[(idx < -n) | (idx >= n)]
                raise IndexError(f"row index {int(bad[0])} out of range for pair store {self.path} with {n} rows")
            idx = np.where(idx < 0, idx + n, idx)
        return idx, scalar

    def iter_blocks(self, block_rows: int | None = None, start: int = 0, stop: int | None = None):
        """Yield ``(row_start, x, y, groups)`` over committed rows ``[start, stop)``.

        Block edges sit at multiples of ``block_rows`` (default ``chunk_rows``, so each
        block is one chunk); the first and last blocks may be shorter.
        """
        n = len(self)
        stop = n if stop is None else stop
        block_rows = self.chunk_rows if block_rows is None else block_rows
        if not 0 <= start <= stop <= n:
            raise IndexError(f"block range [{start}, {stop}) out of range for pair store with {n} rows")
        if block_rows < 1:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        a = start
        while a < stop:
            b = min(stop, (a // block_rows + 1) * block_rows)
            yield (a, *self._read(slice(a, b)))
            a = b

    def _read(self, sel, names=("x", "y", "groups")):
        if isinstance(sel, slice):
            rows = np.arange(sel.start, sel.stop)
            chunk_ids = range(sel.start // self.chunk_rows, -(-sel.stop // self.chunk_rows)) if rows.size else ()
        else:
            rows = sel
            chunk_ids = np.unique(sel // self.chunk_rows).tolist()
        return tuple(self._read_array(name, sel, rows, chunk_ids) if name in self._arrays else None
                     for name in names)

    def _read_array(self, name: str, sel, rows: np.ndarray, chunk_ids) -> np.ndarray:
        arr = self._arrays[name]
        chunk_ids = list(chunk_ids)
        keys = [self._key(arr, c) for c in chunk_ids]
        found = sync(_exist_all(arr.store_path.store, keys))
        for c, ok in zip(chunk_ids, found):
            if not ok:
                raise self._chunk_error(name, c, "chunk file not found", "missing")
        try:
            out = arr[sel] if isinstance(sel, slice) else arr.oindex[sel]
        except _DECODE_ERRORS as exc:
            for c in chunk_ids:  # find which chunk fails to decode
                try:
                    arr[c * self.chunk_rows:min(len(self), (c + 1) * self.chunk_rows)]
                except _DECODE_ERRORS as inner:
                    raise self._chunk_error(name, c, inner, "corrupt") from inner
            raise ValueError(f"pair store {self.path}: reading array {name!r} failed: {exc}") from exc
        if self.dtype == "bfloat16" and name in ("x", "y"):
            out = _bf16_values(out)
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            bad = rows[_bad_rows(out.reshape(out.shape[0], -1))]
            raise self._chunk_error(name, int(bad[0]) // self.chunk_rows,
                                    f"non-finite values in committed rows {bad[:5].tolist()}", "non-finite")
        return out

    @staticmethod
    def _key(arr, chunk: int) -> str:
        coords = (chunk,) + (0,) * (arr.ndim - 1)
        return f"{arr.store_path.path}/{arr.metadata.encode_chunk_key(coords)}"

    def _chunk_error(self, name: str, chunk: int, cause, reason: str) -> ChunkError:
        a = chunk * self.chunk_rows
        b = min(len(self), a + self.chunk_rows) - 1
        key = self._key(self._arrays[name], chunk)
        return ChunkError(f"pair store {self.path}: array {name!r} chunk {chunk} (key {key!r}, "
                          f"rows {a}\u2013{b}) is missing or corrupt: {cause}",
                          array=name, chunk=chunk, key=key, rows=(a, b), reason=reason, detail=str(cause))

    # ------------------------------------------------------------------ auxiliary arrays
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
        if name in _ROW_ARRAYS or name == _AUX_GROUP:
            raise ValueError(f"auxiliary array name {name!r} clashes with the store's own arrays "
                             f"{list(_ROW_ARRAYS)}")
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
            aux = self._group.require_group(_AUX_GROUP)
            live = {e["path"].split("/", 1)[1] for e in registry.values()}
            for orphan in set(aux.array_keys()) - live:  # left by an interrupted put_array
                del aux[orphan]
            node = f"{name}-{uuid.uuid4().hex[:12]}"
            row_bytes = max(1, a.dtype.itemsize * math.prod(a.shape[1:]))
            chunks = (max(1, min(a.shape[0], _AUX_CHUNK_BYTES // row_bytes)),) + tuple(max(1, d) for d in a.shape[1:])
            arr = aux.create_array(node, shape=a.shape, chunks=chunks, dtype=a.dtype,
                                   fill_value=np.nan if a.dtype.kind == "f" else 0,
                                   compressors=zarr.codecs.ZstdCodec(level=3, checksum=True), config=_WRITE_CONFIG)
            if a.size:
                arr[...] = a
            old = registry.get(name)
            registry[name] = {"path": f"{_AUX_GROUP}/{node}", "shape": list(a.shape), "dtype": a.dtype.name,
                              "attrs": attrs, "time": _now()}
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
            keys = [self._key(arr, c) for c in range(n_chunks)]
            found = sync(_exist_all(arr.store_path.store, keys))
            if not all(found):
                raise ValueError(f"{where}: chunk file {keys[found.index(False)]!r} not found")
        try:
            out = arr[...]
        except _DECODE_ERRORS as exc:
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


def _check_timeout(t) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)) or not 0 <= t < math.inf:
        raise ValueError(f"lock_timeout must be a non-negative number of seconds, got {t!r}")
    return float(t)


def _open_group(path: Path, mode: str):
    """``(group, attrs)`` of the pair store at ``path``, or an error saying why it is not one."""
    if not path.exists():
        raise FileNotFoundError(f"no pair store at {path}")
    try:
        group = zarr.open_group(path, mode=mode, zarr_format=3)
    except (zarr.errors.GroupNotFoundError, FileNotFoundError, ValueError) as exc:
        raise ValueError(f"{path} is not a pair store (no Zarr v3 group: {exc})") from None
    attrs = group.attrs.asdict()
    if attrs.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pair store (format attribute {attrs.get('format')!r})")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"pair store {path} has unknown schema_version {attrs.get('schema_version')!r};"
                         f" this unicon_dist reads version {SCHEMA_VERSION}")
    return group, attrs


def _positive_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= 1


def _is_pair_store(path: Path) -> bool:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("attributes", {}).get("format") == FORMAT
