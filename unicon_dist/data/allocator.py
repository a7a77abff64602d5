"""One glibc malloc arena for the whole process, so that a memory budget holds.

Zarr decodes chunks in its own threads, and glibc gives each new thread a malloc arena
of its own (up to eight per core).  The panel buffers decoded there are freed in the
main thread, and the freed memory stays in the decoding thread's arena, where the next
panel, allocated in the main thread, cannot use it: the resident size of a fit from a
store kept growing to 3.5× its ``memory_budget`` (measured while writing this: 200,000
pairs of 64 + 64 float32, budget 64 MiB, +224 MiB peak; with one arena +83 MiB and no
slower; ``benchmarks/bench_memory.py`` measures the result).  ``mallopt(M_ARENA_MAX, 1)`` applies to arenas created
afterwards, so it is set when the store module is imported, before Zarr starts a thread.

It is left alone where the user chose: when ``MALLOC_ARENA_MAX`` (read by glibc at
start-up) is set, or when ``UNICON_DIST_MALLOC_ARENAS`` is "keep".  Not glibc (macOS,
musl, Windows): nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["limit_malloc_arenas", "release_free_memory"]

_M_ARENA_MAX = -8  # from glibc's malloc.h
_done: bool | None = None
_libc = None


def limit_malloc_arenas() -> bool:
    """Limit glibc to one malloc arena (once per process); True if the limit is in force."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("MALLOC_ARENA_MAX") or os.environ.get("UNICON_DIST_MALLOC_ARENAS") == "keep":
        return _done
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(_M_ARENA_MAX, 1))
        global _libc
        _libc = libc
    except (OSError, AttributeError):  # no mallopt in this C library
        _done = False
    return _done


def release_free_memory() -> None:
    """Return the freed pages inside the heap to the OS (glibc ``malloc_trim(0)``).

    Called before each panel is read: the previous panel's buffers are free by then, but
    the heap keeps their pages resident unless they sit at its top, so the peak of the
    same fit varied from run to run by more than a panel (measured on the data of
    tests/test_memory_budget.py: 14.6–41.5 MiB at a 32 MiB budget; with the trim 15–17).
    """
    if _libc is not None:
        _libc.malloc_trim(0)
