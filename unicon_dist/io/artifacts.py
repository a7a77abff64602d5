"""Atomic, pickle-free artifact files: one .npz holding arrays and a JSON header.

A model is a single file so that ``os.replace`` makes its write atomic: a reader sees
the old file or the new one, never a torn write.  The JSON travels inside the archive
as a unicode array, which ``np.load(..., allow_pickle=False)`` reads.

:func:`atomic_write` is the package's one implementation of "write a temporary file,
fsync, rename"; :func:`atomic_save_npz`, :func:`unicon_dist.apps.jobs.atomic_write_text` and
the study's parquet table are written through it.  :func:`load_npz` and
:func:`read_header` are the one reader: whatever is wrong with a file -- empty,
zero-filled, truncated, another kind of file, an archive without the header, a missing
or non-finite array -- they raise :class:`ArtifactError` naming the file and the problem.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import zipfile
import zlib
from pathlib import Path

import numpy as np

__all__ = ["ArtifactError", "atomic_write", "atomic_save_npz", "load_npz", "read_header"]

_HEADER = "__header_json__"
_ZIP_MAGIC = b"PK\x03\x04"
# bytes looked at to tell a zero-filled file from another file that is no archive
_SNIFF_BYTES = 1 << 16
# how a damaged archive fails: in zipfile (BadZipFile, EOFError, zlib.error), in numpy's
# .npy member parser (ValueError) or while reading (OSError, KeyError)
_READ_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError, KeyError)


class ArtifactError(ValueError):
    """A model or checkpoint file that cannot be used: damaged, or not a unicon_dist artifact.

    A ``ValueError``, so callers that handle bad input (the CLI among them) handle it too.
    The message reads ``cannot read <kind> <path>: <problem>[; <hint>]``.

    Attributes
    ----------
    path : str
        The file.
    kind : str
        What the file was read as: ``"model"`` or ``"checkpoint"``.
    problem : str
        What is wrong with it.
    damaged : bool
        True when the file is (or may be) a damaged artifact of this kind, False when it
        is another kind of file; the ``hint`` is only given for a damaged file.
    """

    def __init__(self, path, problem: str, *, kind: str = "model", damaged: bool = True, hint: str | None = None):
        self.path, self.kind, self.problem, self.damaged = str(path), kind, problem, damaged
        hint = hint if damaged else None
        super().__init__(f"cannot read {kind} {self.path}: {problem}" + (f"; {hint}" if hint else ""))


# --------------------------------------------------------------------------- writing
def _create_temp(path: Path) -> tuple[int, Path]:
    """Create and open a new temporary file next to ``path``: (descriptor, its path).

    ``tempfile.mkstemp`` creates files with mode 0600 whatever the umask, and the rename
    keeps that mode, so files meant to be shared came out private.  ``os.open`` with
    0o666 lets the kernel apply the umask (and a folder's default ACL) as a plain
    ``open`` does; reading the umask to ``chmod`` afterwards would race with other
    threads, since ``os.umask`` can only be read by setting it.  ``O_EXCL`` and a random
    name give mkstemp's guarantee that no existing file is opened.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(16):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}: 16 random names were taken")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where a folder cannot be opened or synced."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename stands
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", *, encoding: str = "utf-8"):
    """Write ``path`` atomically: a temporary file in the same folder, fsync, rename.

    Parameters
    ----------
    path : str or Path
        The file to write; missing parent folders are created.  An existing file is
        replaced only when the ``with`` block finishes without an exception.
    mode : {"wb", "w"}
        Binary or text.
    encoding : str
        Of text mode.

    Yields
    ------
    file object
        Open on the temporary file; the block must not close it.

    Notes
    -----
    A reader sees the previous file or the complete new one, never a torn write; on an
    exception the temporary file is removed and the previous file is untouched.  The
    new file's mode is ``0o666 & ~umask``, as for a file created by ``open(path, "w")``;
    the mode of a replaced file is not carried over.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        try:
            fh = os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": encoding}))
        except BaseException:
            os.close(fd)
            raise
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_save_npz(path, header: dict, arrays: dict) -> Path:
    """Write ``arrays`` and the JSON-serialisable ``header`` to ``path`` atomically."""
    path = Path(path)
    for k, v in arrays.items():
        if np.asarray(v).dtype == object:
            raise TypeError(f"array {k!r} has dtype object, which cannot be saved without pickle")
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    payload[_HEADER] = np.array(json.dumps(header, sort_keys=True))
    with atomic_write(path, "wb") as fh:
        np.savez(fh, **payload)
    return path


# --------------------------------------------------------------------------- reading
def read_header(path, *, kind: str = "model", format: str | None = None, keys=(), hint: str | None = None) -> dict:
    """The JSON header of a file written by :func:`atomic_save_npz`, reading no array.

    Parameters and errors as in :func:`load_npz`, less the checks of the arrays.
    """
    path = Path(path)
    header, _ = _read(path, kind, hint, arrays=False)
    _check_header(path, header, kind, format, keys, hint)
    return header


def load_npz(path, *, kind: str = "model", format: str | None = None, keys=(), required=(),
             hint: str | None = None) -> tuple[dict, dict]:
    """Read a file written by :func:`atomic_save_npz`: (header, arrays), every array checked.

    Parameters
    ----------
    path : str or Path
        The file.
    kind : str
        What the file should be (``"model"``, ``"checkpoint"``), for the messages.
    format : str, optional
        The ``"format"`` the header must name.
    keys : iterable of str
        Keys the header must hold.
    required : iterable of str
        Arrays the file must hold.
    hint : str, optional
        What the user can do about a damaged file (e.g. that a checkpoint can be
        deleted), appended to the message of every :class:`ArtifactError` whose
        ``damaged`` is True.

    Returns
    -------
    header : dict
    arrays : dict of str to ndarray

    Raises
    ------
    FileNotFoundError
        No such file.
    ArtifactError
        (a ValueError) The file is damaged -- empty, zero-filled, a truncated or
        corrupted archive, a header without ``keys``, missing a ``required`` array, or a
        floating array holding NaN or Inf, which a saved model or checkpoint never does --
        or it is not this kind of file: a directory, no .npz archive, an archive without
        the unicon_dist header, or a header naming another ``format``.
    """
    path = Path(path)
    header, arrays = _read(path, kind, hint, arrays=True)
    _check_header(path, header, kind, format, keys, hint)
    missing = [k for k in required if k not in arrays]
    if missing:
        raise ArtifactError(path, f"it is damaged: it has no array {', '.join(map(repr, missing))}",
                            kind=kind, hint=hint)
    for name, a in arrays.items():
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            bad = a.size - int(np.count_nonzero(np.isfinite(a)))
            raise ArtifactError(path, f"it is damaged: array {name!r} of shape {a.shape} holds NaN or Inf in "
                                f"{bad} of its {a.size} entries", kind=kind, hint=hint)
    return header, arrays


def _check_header(path: Path, header: dict, kind: str, format: str | None, keys, hint: str | None) -> None:
    got = header.get("format")
    if format is not None and got != format:
        # "unicon_dist.checkpoint/1" -> "a unicon_dist checkpoint": say what the file is when it is ours
        ours = re.fullmatch(r"unicon_dist\.(\w+)/\d+", got) if isinstance(got, str) else None
        what = f" (it is a unicon_dist {ours.group(1)})" if ours else ""
        raise ArtifactError(path, f"it is not a unicon_dist {kind}: its header names the format {got!r}{what}, "
                            f"expected {format!r}", kind=kind, damaged=False)
    missing = [k for k in keys if k not in header]
    if missing:
        raise ArtifactError(path, f"it is damaged: its header has no {', '.join(map(repr, missing))}",
                            kind=kind, hint=hint)


def _sniff(path: Path, kind: str, hint: str | None) -> None:
    """Raise ArtifactError when the first bytes of ``path`` show that it is no .npz archive."""
    with open(path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    if head.startswith(_ZIP_MAGIC):
        return
    if not head:
        raise ArtifactError(path, "it is damaged: the file is empty (0 bytes)", kind=kind, hint=hint)
    if not head.strip(b"\0"):
        raise ArtifactError(path, "it is damaged: the file is zero-filled (its contents were lost)",
                            kind=kind, hint=hint)
    raise ArtifactError(path, f"it is not a unicon_dist {kind}: not an .npz archive (it starts with {head[:8]!r})",
                        kind=kind, damaged=False)


def _read(path: Path, kind: str, hint: str | None, arrays: bool) -> tuple[dict, dict]:
    """(header, arrays or {}) of ``path``; the archive and the header diagnosed, not the arrays' values."""
    def damaged(problem: str, exc: Exception) -> ArtifactError:
        return ArtifactError(path, f"it is damaged: {problem} ({type(exc).__name__}: {exc})", kind=kind, hint=hint)

    if path.is_dir():
        raise ArtifactError(path, "it is a directory, not a file", kind=kind, damaged=False)
    if not path.exists():
        raise FileNotFoundError(f"no such {kind} file: {path}")
    _sniff(path, kind, hint)
    try:
        data = np.load(path, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise damaged("a truncated or corrupted .npz archive", exc) from exc
    with data:
        if _HEADER not in data.files:
            held = ", ".join(map(repr, data.files[:8])) or "no arrays"
            raise ArtifactError(path, f"it is not a unicon_dist {kind}: an .npz archive without the unicon_dist "
                                f"header (it holds {held})", kind=kind, damaged=False)
        try:
            header = json.loads(str(data[_HEADER]))
        except (json.JSONDecodeError, *_READ_ERRORS) as exc:
            raise damaged("its header cannot be read", exc) from exc
        if not isinstance(header, dict):
            raise ArtifactError(path, "it is damaged: its header is not a JSON object", kind=kind, hint=hint)
        out = {}
        for name in data.files if arrays else ():
            if name != _HEADER:
                try:
                    out[name] = data[name]
                except _READ_ERRORS as exc:
                    raise damaged(f"array {name!r} cannot be read", exc) from exc
    return header, out
