"""Writer exclusion of a pair store: one writer at a time, across processes and hosts.

Every write of a :class:`~unicon_dist.data.store.PairStore` (``append``, ``put_array``,
``delete_array``, ``set_label_names``, ``add_history``, and ``create(overwrite=True)`` of
an existing store) holds an exclusive advisory lock, ``fcntl.flock`` on
``<store>/.writer.lock`` (:data:`LOCK_FILE`), from start to commit, so writers from any
number of processes and handles run one after another and never lose or mix committed
rows:

* The lock belongs to an open file description: two handles in one process exclude each
  other too, and the kernel drops the lock when its holder dies, even by SIGKILL.
* A writer waits at most ``lock_timeout`` seconds (``open``/``create`` keyword, default
  :data:`DEFAULT_LOCK_TIMEOUT`), then raises :class:`StoreLockedError` (a
  ``TimeoutError``) naming the holder: the holder writes its pid, host, start time,
  operation and ``sys.argv`` into the lock file.
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
only).  Object stores (S3, GCS) are not supported.  Readers take no lock and never block.

The holder's description is written in place (``ftruncate`` + ``pwrite`` on the locked
file), not by an atomic rename: the lock belongs to that file's inode, and a rename would
put a new, unlocked inode at the path.
"""

from __future__ import annotations

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
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

__all__ = ["LOCK_FILE", "DEFAULT_LOCK_TIMEOUT", "PARTIAL_FILE", "StoreLockedError", "ConcurrentWriteError",
           "WriterLock", "check_lock_timeout", "read_lock_holder", "describe_holder", "partial_files",
           "remove_partials"]

log = logging.getLogger(__name__)

LOCK_FILE = ".writer.lock"
DEFAULT_LOCK_TIMEOUT = 60.0
# zarr.storage.LocalStore writes key K through K.with_suffix(f".{uuid4().hex}.partial")
# (zarr/storage/_local.py, _atomic_write); nothing else in a store ends like this
PARTIAL_FILE = re.compile(r".+\.[0-9a-f]{32}\.partial")


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


def check_lock_timeout(t) -> float:
    """``t`` as float seconds, or a ValueError: a number in [0, inf)."""
    if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)) or not 0 <= t < math.inf:
        raise ValueError(f"lock_timeout must be a non-negative number of seconds, got {t!r}")
    return float(t)


def read_lock_holder(path: Path) -> dict | None:
    """The description the lock's holder wrote (reopened by path: on NFS a fresh open
    revalidates the cached data)."""
    try:
        text = path.read_text(encoding="utf-8")
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(holder: dict | None) -> str:
    """``holder`` (from :func:`read_lock_holder`) as "by pid ... on host ... since ...", for messages."""
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


class WriterLock:
    """An exclusive ``flock`` on ``<store>/.writer.lock``, owned by one open file description.

    ``unclean`` is true when the previous holder did not release the lock normally (it
    died, or its write raised): its description was still in the file.
    """

    def __init__(self, fd: int, path: Path, unclean: bool, writable: bool):
        self.fd, self.path, self.unclean, self._writable = fd, path, unclean, writable

    @classmethod
    def acquire(cls, store: Path, timeout: float, operation: str) -> "WriterLock":
        """Lock the store directory ``store`` for ``operation``, waiting at most ``timeout`` seconds.

        Raises
        ------
        StoreLockedError
            Another holder kept the lock for ``timeout`` seconds.
        OSError
            The file system does not support ``flock`` between processes (the message
            says which mount option or permission is missing).
        """
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
                    holder = read_lock_holder(path)
                    raise StoreLockedError(
                        f"pair store {store}: the writer lock {path} is held {describe_holder(holder)}; "
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


def partial_files(root: Path) -> list[Path]:
    """Zarr's write temporaries (``*.<32 hex>.partial``) anywhere under the store ``root``."""
    found = []
    for dirpath, _, filenames in os.walk(root):
        found += [Path(dirpath) / f for f in filenames if PARTIAL_FILE.fullmatch(f)]
    return sorted(found)


def remove_partials(root: Path) -> None:
    """Delete write temporaries; only under the writer lock, when none can be in flight."""
    for f in partial_files(root):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
            log.info("pair store %s: removed %s, left by an interrupted write", root, f.relative_to(root))

