"""PairStore writer exclusion: concurrent and stale writers never lose or mix committed rows.

Processes are plain ``python -c`` children (no fork of a process that holds torch or zarr
state); each waits on a file so that the interesting part starts at the same moment.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import zarr

from unicon_dist.data.store import LOCK_FILE, ConcurrentWriteError, PairStore, StoreLockedError

DX, DY = 3, 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTIAL_HEX = "0123456789abcdef" * 2  # the 32 hex digits of zarr's uuid4().hex


def _rows(n, value=0.0):
    return np.full((n, DX), value), np.full((n, DY), value)


def _tagged(writer, block, n):
    """Rows that say where they came from: (writer, block, row within the block)."""
    x = np.zeros((n, DX))
    x[:, 0], x[:, 1], x[:, 2] = writer, block, np.arange(n)
    y = np.zeros((n, DY))
    y[:, 0], y[:, 1], y[:, 2], y[:, 3] = writer, block, np.arange(n), -1
    return x, y


def _child(code: str, *args) -> subprocess.Popen:
    script = f"import sys\nsys.path.insert(0, {ROOT!r})\n" + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"child exited early ({proc.returncode}): {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"child did not reach {path}"
        time.sleep(0.02)


# ------------------------------------------------------------------ two processes at once
def test_two_processes_append_concurrently(tmp_path):
    """Both writers' blocks are all committed, whole, contiguous and unmixed."""
    path = tmp_path / "p.zarr"
    PairStore.create(path, DX, DY, chunk_rows=64)  # blocks of 50 straddle chunks: shared chunks are rewritten
    go = tmp_path / "go"
    code = """
        import json, os, time
        import numpy as np
        from unicon_dist.data.store import PairStore
        w, path, go = int(sys.argv[1]), sys.argv[2], sys.argv[3]
        store = PairStore.open(path, mode="r+")  # opened before the other's appends: a stale handle
        open(f"{go}.ready{w}", "w").close()
        while not os.path.exists(go):
            time.sleep(0.005)
        out = []
        for b in range(20):
            x = np.zeros((50, 3)); y = np.zeros((50, 5))
            x[:, 0] = y[:, 0] = w; x[:, 1] = y[:, 1] = b; x[:, 2] = y[:, 2] = np.arange(50); y[:, 3] = -1
            out.append(store.append(x, y, source=f"w{w}b{b}"))
        print(json.dumps(out))
    """
    procs = [_child(code, w, path, go) for w in (1, 2)]
    for w, p in zip((1, 2), procs):
        _wait_for(f"{go}.ready{w}", p)
    go.touch()
    ranges = {}
    for w, p in zip((1, 2), procs):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        ranges[w] = [tuple(r) for r in json.loads(out)]
    store = PairStore.open(path)
    n = len(store)
    assert n == sum(b - a for rs in ranges.values() for a, b in rs) == 2000
    x, y, _ = store.read()
    covered = np.zeros(n, dtype=int)
    for w, rs in ranges.items():
        for b, (a, z) in enumerate(rs):
            assert z - a == 50
            want_x, want_y = _tagged(w, b, 50)
            np.testing.assert_array_equal(x[a:z], want_x)  # the whole block, where append said
            np.testing.assert_array_equal(y[a:z], want_y)  # and x and y of each row from the same block
            covered[a:z] += 1
    assert (covered == 1).all()  # disjoint and complete: nothing lost, nothing written twice
    log = store.attrs["appends"]
    assert len(log) == 40 and sorted(tuple(e["rows"]) for e in log) == sorted(r for rs in ranges.values() for r in rs)


def test_threads_sharing_one_handle(tmp_path):
    store = PairStore.create(tmp_path / "p.zarr", DX, DY, chunk_rows=8)
    got, errors = [], []

    def work(w):
        try:
            for b in range(10):
                got.append((w, b, store.append(*_tagged(w, b, 5))))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    x, y, _ = PairStore.open(store.path).read()
    assert len(x) == 100
    for w, b, (a, z) in got:
        np.testing.assert_array_equal(x[a:z], _tagged(w, b, 5)[0])


def test_waiter_is_not_starved_by_a_writer_in_a_loop(tmp_path):
    """flock has no queue for LOCK_NB tries; the wait must not be a poll that never wins."""
    path = tmp_path / "p.zarr"
    PairStore.create(path, DX, DY, chunk_rows=8)
    busy, other = PairStore.open(path, "r+"), PairStore.open(path, "r+", lock_timeout=30)
    stop, count = threading.Event(), [0]

    def loop():
        while not stop.is_set() and count[0] < 200:
            busy.append(*_rows(1, 1.0))
            count[0] += 1

    t = threading.Thread(target=loop)
    t.start()
    try:
        while count[0] < 3:  # the loop is under way
            time.sleep(0.005)
        start, _ = other.append(*_rows(1, 2.0))
        at = count[0]
    finally:
        stop.set()
        t.join()
    assert at < 200  # it got in while the loop was still appending (a poll of LOCK_NB never does)
    x = PairStore.open(path).read()[0]
    assert (x[start] == 2).all() and (x[np.arange(len(x)) != start] == 1).all()


# ------------------------------------------------------------------ stale handles
def test_stale_handle_append_merges(tmp_path):
    path = tmp_path / "p.zarr"
    PairStore.create(path, DX, DY, chunk_rows=4)
    h1, h2 = PairStore.open(path, "r+"), PairStore.open(path, "r+")
    assert h2.append(*_rows(10, 1.0)) == (0, 10)
    assert h1.append(*_rows(5, 2.0)) == (10, 15)  # after h2's rows, not over them
    assert len(h1) == 15
    x, y, _ = PairStore.open(path).read()
    assert len(x) == 15 and (x[:10] == 1).all() and (x[10:] == 2).all() and (y[10:] == 2).all()
    assert [e["rows"] for e in PairStore.open(path).attrs["appends"]] == [[0, 10], [10, 15]]
    assert h2.append(*_rows(1, 3.0)) == (15, 16)


def test_stale_handle_attribute_updates_merge(tmp_path):
    path = tmp_path / "p.zarr"
    PairStore.create(path, DX, DY, chunk_rows=4, labels=True)
    h1, h2 = PairStore.open(path, "r+"), PairStore.open(path, "r+")
    h2.append(*_rows(10), labels=np.arange(10) % 3)
    h1.add_history({"run": 1})  # must not write back h1's n_rows = 0
    r = PairStore.open(path)
    assert len(r) == 10 and r.history == [{"run": 1}] and len(r.attrs["appends"]) == 1
    h2.add_history({"run": 2})  # nor drop h1's record
    assert PairStore.open(path).history == [{"run": 1}, {"run": 2}]
    h1.put_array("a", np.ones(2))
    h2.put_array("b", np.zeros(3))  # h2 never saw "a": neither dropped nor deleted as an orphan
    assert PairStore.open(path).array_names() == ["a", "b"]
    np.testing.assert_array_equal(PairStore.open(path).get_array("a"), np.ones(2))
    h2.delete_array("a")  # known to h2 only through the disk
    assert PairStore.open(path).array_names() == ["b"]
    with pytest.raises(ValueError, match=r"committed labels outside \[0, 2\) in rows 2, 5, 8"):
        h1.set_label_names(["u", "v"])  # checks h2's rows too
    h1.set_label_names(["u", "v", "w"])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        h2.append(*_rows(2), labels=[0, 5])  # h2 learns the names h1 set
    r = PairStore.open(path)
    assert len(r) == 10 and r.label_names == ["u", "v", "w"] and r.history == [{"run": 1}, {"run": 2}]


def test_recreated_store_is_not_written_through_an_old_handle(tmp_path):
    path = tmp_path / "p.zarr"
    PairStore.create(path, DX, DY, chunk_rows=4).append(*_rows(3))
    old = PairStore.open(path, "r+")
    PairStore.create(path, DX + 1, DY, chunk_rows=4, overwrite=True)
    with pytest.raises(ConcurrentWriteError, match=r"was re-created since this handle was opened .*open it again"):
        old.append(*_rows(2))
    assert len(PairStore.open(path)) == 0


# ------------------------------------------------------------------ the lock itself
def test_two_handles_in_one_process_exclude_each_other(tmp_path):
    path = tmp_path / "p.zarr"
    PairStore.create(path, DX, DY, chunk_rows=4)
    h1, h2 = PairStore.open(path, "r+"), PairStore.open(path, "r+", lock_timeout=0.2)
    with h1._writing("test"):
        t0 = time.monotonic()
        with pytest.raises(StoreLockedError, match=rf"held by pid {os.getpid()} .*operation: test") as err:
            h2.append(*_rows(1))
        assert 0.2 <= time.monotonic() - t0 < 5
        assert isinstance(err.value, TimeoutError) and err.value.holder["pid"] == os.getpid()
        assert PairStore.open(path).read()[0].shape == (0, DX)  # readers do not wait
    assert h2.append(*_rows(1)) == (0, 1)
    assert (path / LOCK_FILE).read_text() == ""  # a clean release leaves no description


def test_readers_take_no_lock(tmp_path):
    path = tmp_path / "p.zarr"
    PairStore.create(path, DX, DY, chunk_rows=4)
    (path / LOCK_FILE).unlink()  # create made it
    r = PairStore.open(path)
    r.read(), list(r.iter_blocks()), r.refresh()
    assert not (path / LOCK_FILE).exists()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_lock_held_by_another_process_then_sigkilled(tmp_path):
    """A holder blocks writers (the error names it); killed with SIGKILL, it releases the lock."""
    path = tmp_path / "p.zarr"
    store = PairStore.create(path, DX, DY, chunk_rows=4)
    store.append(*_rows(10, 1.0))
    ready = tmp_path / "ready"
    child = _child(f"""
        import time
        import numpy as np
        from pathlib import Path
        from unicon_dist.data.store import PairStore
        orig = PairStore._write
        def stuck(self, name, start, data):
            orig(self, name, start, data)
            if name == "x":  # mid-append, holding the lock, with a zarr temporary in flight
                Path({str(path)!r}, "y", "c", "3").mkdir(parents=True, exist_ok=True)
                Path({str(path)!r}, "y", "c", "3", "0.{PARTIAL_HEX}.partial").write_bytes(b"half")
                Path({str(ready)!r}).touch()
                time.sleep(120)
        PairStore._write = stuck
        PairStore.open({str(path)!r}, mode="r+").append(np.full((7, {DX}), 9.0), np.full((7, {DY}), 9.0))
    """)
    try:
        _wait_for(ready, child)
        waiter = PairStore.open(path, "r+", lock_timeout=0.3)
        with pytest.raises(StoreLockedError, match=rf"held by pid {child.pid} on host .* since .*operation: append"):
            waiter.append(*_rows(2, 2.0))
        with pytest.raises(StoreLockedError, match=rf"pid {child.pid}"):
            PairStore.create(path, DX, DY, overwrite=True, lock_timeout=0.2)  # nor pulled from under it
        assert len(PairStore.open(path)) == 10  # readers: the committed rows, at once
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    partial = path / "y" / "c" / "3" / f"0.{PARTIAL_HEX}.partial"
    assert partial.exists() and json.loads((path / LOCK_FILE).read_text())["pid"] == child.pid
    t0 = time.monotonic()
    assert waiter.append(*_rows(2, 2.0)) == (10, 12)  # the kernel dropped the dead holder's lock
    assert time.monotonic() - t0 < 5
    assert not partial.exists()  # its temporary was removed under the lock
    x, y, _ = PairStore.open(path).read()
    assert len(x) == 12 and (x[:10] == 1).all() and (x[10:] == 2).all() and (y[10:] == 2).all()


def test_stray_partials_removed_by_the_next_writer(tmp_path):
    path = tmp_path / "p.zarr"
    store = PairStore.create(path, DX, DY, chunk_rows=4)
    store.append(*_rows(6))
    store.put_array("emb", np.ones((2, 2)))
    aux_node = store.attrs["aux"]["emb"]["path"]
    planted = [path / f"zarr.{PARTIAL_HEX}.partial", path / "x" / "c" / "1" / f"0.{PARTIAL_HEX}.partial",
               path / "x" / f"zarr.{PARTIAL_HEX}.partial", path / aux_node / f"zarr.{PARTIAL_HEX}.partial"]
    keep = [path / "notes.partial", path / "x" / "c" / "1" / "0.not-hex.partial"]  # not zarr's names
    for f in planted + keep:
        f.write_bytes(b"x")
    reader = PairStore.open(path)
    reader.read()
    assert all(f.exists() for f in planted)  # readers leave them alone
    assert PairStore.open(path, "r+").add_history({"k": 1}) is None  # a fresh handle's first write
    assert not any(f.exists() for f in planted) and all(f.exists() for f in keep)
    # an interrupted write (zarr keeps its temporary on KeyboardInterrupt) marks the lock unclean,
    # so even a handle that already swept sweeps again
    writer = PairStore.open(path, "r+")
    writer.append(*_rows(1))
    planted[1].write_bytes(b"x")
    orig = PairStore._write

    def interrupted(self, name, start, data):
        raise KeyboardInterrupt

    PairStore._write = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            writer.append(*_rows(1))
    finally:
        PairStore._write = orig
    assert (path / LOCK_FILE).read_text()  # the holder's description stays: not a clean release
    assert writer.append(*_rows(1)) == (7, 8)
    assert not planted[1].exists() and len(PairStore.open(path)) == 8


def test_commit_point_detects_a_writer_without_the_lock(tmp_path, monkeypatch):
    path = tmp_path / "p.zarr"
    store = PairStore.create(path, DX, DY, chunk_rows=4)
    store.append(*_rows(10, 1.0))
    orig = PairStore._write

    def rogue(self, name, start, data):  # between the re-read under the lock and the commit
        orig(self, name, start, data)
        if name == "y":
            zarr.open_group(path, mode="r+").update_attributes({"n_rows": 13})

    monkeypatch.setattr(PairStore, "_write", rogue)
    with pytest.raises(ConcurrentWriteError, match=r"n_rows on disk is 13, but this write started from 10 .*"
                                                   r"without the lock.*Nothing was committed"):
        store.append(*_rows(5, 2.0))
    monkeypatch.undo()
    attrs = PairStore.open(path).attrs
    assert attrs["n_rows"] == 13 and [e["rows"] for e in attrs["appends"]] == [[0, 10]]  # ours not committed
    zarr.open_group(path, mode="r+").update_attributes({"n_rows": 10})
    assert store.append(*_rows(1, 3.0)) == (10, 11)  # and the lock was released


def test_lock_timeout_validated(tmp_path):
    path = tmp_path / "p.zarr"
    PairStore.create(path, DX, DY, chunk_rows=4)
    for bad in (-1, float("nan"), float("inf"), "5", True):
        with pytest.raises(ValueError, match="lock_timeout must be a non-negative number"):
            PairStore.open(path, "r+", lock_timeout=bad)
    assert PairStore.open(path, "r+", lock_timeout=0).lock_timeout == 0.0
