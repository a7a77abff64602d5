"""PairStore: Zarr v3 round trips, append atomicity, bad input and damaged chunks."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

import unicon_dist as ud
from unicon_dist.data.store import PairStore, default_chunk_rows

DX, DY, CH = 3, 5, 4  # tiny dims; 4 rows per chunk so a few rows span several chunks
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pairs(n, seed=0, groups=False):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((n, DX)), rng.standard_normal((n, DY))
    return (x, y, rng.integers(0, 4, n)) if groups else (x, y)


def _store(tmp_path, n=10, groups=False, **kw):
    s = PairStore.create(tmp_path / "p.zarr", DX, DY, groups=groups, chunk_rows=CH, **kw)
    if n:
        s.append(*_pairs(n, groups=groups))
    return s


def _chunk_file(s, name, chunk):
    return s.path / name / "c" / str(chunk) / ("0" if name in ("x", "y") else "")


# ------------------------------------------------------------------ round trips
def test_exported():
    assert ud.PairStore is PairStore and "PairStore" in ud.__all__


@pytest.mark.parametrize("groups", [False, True])
def test_round_trip_multiple_appends_and_reopen(tmp_path, groups):
    s = PairStore.create(tmp_path / "p.zarr", DX, DY, groups=groups, chunk_rows=CH,
                         provenance={"encoder": "test"})
    parts = [_pairs(n, seed=n, groups=groups) for n in (7, 1, 9)]
    ranges = [s.append(*p, source=f"part{i}") for i, p in enumerate(parts)]
    assert ranges == [(0, 7), (7, 8), (8, 17)] and len(s) == 17
    r = PairStore.open(tmp_path / "p.zarr")
    x, y, g = r.read(slice(None))
    np.testing.assert_array_equal(x, np.concatenate([p[0] for p in parts]).astype(np.float32))
    np.testing.assert_array_equal(y, np.concatenate([p[1] for p in parts]).astype(np.float32))
    if groups:
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, np.concatenate([p[2] for p in parts]))
    else:
        assert g is None
    assert (len(r), r.dim_x, r.dim_y, r.dtype, r.has_groups, r.chunk_rows) == (17, DX, DY, "float32", groups, CH)
    a = r.attrs
    assert a["format"] == "unicon_dist.pairstore" and a["schema_version"] == 1 and a["n_rows"] == 17
    assert r.provenance == {"encoder": "test"} and "created" in a
    assert [e["rows"] for e in a["appends"]] == [[0, 7], [7, 8], [8, 17]]
    assert a["appends"][1]["source"] == "part1"


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_storage_dtype(tmp_path, dtype):
    s = _store(tmp_path, n=0, dtype=dtype)
    x, y = _pairs(6)
    s.append(x, y)
    rx, ry, _ = PairStore.open(s.path).read(slice(None))
    assert rx.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(rx, x.astype(dtype))
    np.testing.assert_array_equal(ry, y.astype(dtype))


def test_bfloat16_storage(tmp_path):
    import torch

    s = _store(tmp_path, n=0, dtype="bfloat16")
    x, y = _pairs(6)
    s.append(x, y)
    r = PairStore.open(s.path)
    rx, ry, _ = r.read(slice(None))
    # read back as float32 holding exactly torch's round-to-nearest-even bfloat16 values
    assert rx.dtype == np.float32 and r.dtype == "bfloat16" and r.itemsize == 2
    np.testing.assert_array_equal(rx, torch.tensor(x).to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(ry, torch.tensor(y).to(torch.bfloat16).float().numpy())
    assert not np.array_equal(rx, x.astype(np.float32))  # it did round
    grp = zarr.open_group(s.path, mode="r")
    assert grp["x"].dtype == np.uint16  # the 16-bit patterns
    assert default_chunk_rows(DX, DY, "bfloat16") == default_chunk_rows(DX, DY, "float16")
    with pytest.raises(ValueError, match=r"x has values out of range for bfloat16 in rows 7"):
        s.append(np.vstack([x[:1], np.full((1, DX), 1e39)]), y[:2])
    assert len(s) == 6
    # a fit from the bfloat16 store is the fit on the rounded arrays
    m_store = ud.UniCon(rank=2, max_iter=2).fit(s.path)
    m_mem = ud.UniCon(rank=2, max_iter=2).fit(rx, ry)
    np.testing.assert_allclose(m_store.W_, m_mem.W_, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bool_rows_stored_as_zero_one(tmp_path, dtype):
    """Numeric, bool included, as fit accepts: True/False are stored as 1/0 in the store dtype."""
    s = _store(tmp_path, n=0, dtype=dtype)
    x = np.arange(6 * DX).reshape(6, DX) % 3 == 0
    y = np.arange(6 * DY).reshape(6, DY) % 2 == 1
    assert s.append(x, y) == (0, 6)
    rx, ry, _ = PairStore.open(s.path).read()
    assert rx.dtype == np.float32
    np.testing.assert_array_equal(rx, x.astype(np.float32))
    np.testing.assert_array_equal(ry, y.astype(np.float32))
    assert s.append(np.ones((2, DX), dtype=np.int8), y[:2]) == (6, 8)  # and mixed with integers


def test_layout_chunks_and_zstd(tmp_path):
    s = _store(tmp_path, n=0, groups=True)
    grp = zarr.open_group(s.path, mode="r")
    assert grp["x"].chunks == (CH, DX) and grp["y"].chunks == (CH, DY) and grp["groups"].chunks == (CH,)
    assert grp["groups"].dtype == np.int64
    assert all(isinstance(c, zarr.codecs.ZstdCodec) for n in ("x", "y", "groups") for c in grp[n].compressors)
    assert grp.metadata.zarr_format == 3


def test_default_chunk_rows_at_least_one_mib(tmp_path):
    for dx, dy, dt in [(3, 5, "float32"), (512, 768, "float16"), (4096, 10, "float64"), (10**6, 2, "float32")]:
        rows = default_chunk_rows(dx, dy, dt)
        assert rows % 64 == 0 and rows >= 64
        assert rows * max(dx, dy) * np.dtype(dt).itemsize >= 2**20
    s = PairStore.create(tmp_path / "d.zarr", 256, 128)
    assert s.chunk_rows == 1024 and zarr.open_group(s.path, mode="r")["x"].chunks == (1024, 256)


def test_read_index_forms(tmp_path):
    s = _store(tmp_path, n=10, groups=True)
    x, y, g = s.read(slice(None))
    idx = np.array([9, 0, 5, 5, -1])
    rx, ry, rg = s.read(idx)
    np.testing.assert_array_equal(rx, x[idx])
    np.testing.assert_array_equal(ry, y[idx])
    np.testing.assert_array_equal(rg, g[idx])
    np.testing.assert_array_equal(s.read(slice(1, 9, 3))[0], x[1:9:3])
    np.testing.assert_array_equal(s.read(slice(3, 6))[1], y[3:6])
    one = s.read(4)
    assert one[0].shape == (DX,) and one[2] == g[4]
    mask = np.arange(10) % 3 == 0
    np.testing.assert_array_equal(s.read(mask)[0], x[mask])
    assert s.read(np.array([], dtype=int))[0].shape == (0, DX) and s.read([])[2].shape == (0,)
    assert s.read(slice(10, 20))[0].shape == (0, DX)


@pytest.mark.parametrize("rows", [10, -11, np.array([0, 10]), [3, 99]])
def test_read_out_of_range(tmp_path, rows):
    s = _store(tmp_path, n=10)
    with pytest.raises(IndexError, match="out of range .* 10 rows"):
        s.read(rows)


def test_read_bad_index_type(tmp_path):
    s = _store(tmp_path, n=10)
    with pytest.raises(IndexError, match="rows must be"):
        s.read(np.array([0.5]))
    with pytest.raises(IndexError, match="mask"):
        s.read(np.ones(3, dtype=bool))


@pytest.mark.parametrize("block_rows,start,stop", [(None, 0, None), (None, 3, 13), (6, 1, 17), (1, 0, 5)])
def test_iter_blocks_cover_rows_once(tmp_path, block_rows, start, stop):
    s = _store(tmp_path, n=17, groups=True)
    x, y, g = s.read(slice(None))
    stop_ = 17 if stop is None else stop
    seen = []
    for r0, bx, by, bg in s.iter_blocks(block_rows, start=start, stop=stop):
        step = block_rows or CH
        assert r0 == start or r0 % step == 0  # aligned to block (= chunk) boundaries
        end = r0 + len(bx)
        assert len(bx) == len(by) == len(bg) <= step and (end == stop_ or end % step == 0)
        np.testing.assert_array_equal(bx, x[r0:r0 + len(bx)])
        np.testing.assert_array_equal(bg, g[r0:r0 + len(bx)])
        seen.extend(range(r0, r0 + len(bx)))
    assert seen == list(range(start, stop_))
    with pytest.raises(IndexError, match="out of range"):
        list(s.iter_blocks(start=5, stop=18))


def test_all_zero_chunks_exist_after_reopen(tmp_path):
    """write_empty_chunks must hold on reopen, else zero chunks would look missing."""
    s = _store(tmp_path, n=0, groups=True)
    s.append(np.zeros((5, DX)), np.zeros((5, DY)), np.zeros(5, dtype=int))
    r = PairStore.open(s.path, mode="r+")
    r.append(np.zeros((8, DX)), np.zeros((8, DY)), np.zeros(8, dtype=np.uint8))
    x, y, g = PairStore.open(s.path).read(slice(None))
    assert len(x) == 13 and not x.any() and not y.any() and not g.any()


# ------------------------------------------------------------------ atomicity
def test_append_interrupted_after_x(tmp_path, monkeypatch):
    s = _store(tmp_path, n=10, groups=True)
    before = s.read(slice(None))
    orig = PairStore._write

    def failing(self, name, start, data):
        orig(self, name, start, data)
        if name == "x":
            raise KeyboardInterrupt("killed mid-append")

    monkeypatch.setattr(PairStore, "_write", failing)
    with pytest.raises(KeyboardInterrupt):
        s.append(*_pairs(6, seed=1, groups=True))
    monkeypatch.setattr(PairStore, "_write", orig)
    assert len(s) == 10
    r = PairStore.open(s.path, mode="r+")
    assert len(r) == 10 and zarr.open_group(s.path, mode="r")["x"].shape[0] == 16  # x grew, uncommitted
    for a, b in zip(before, r.read(slice(None))):
        np.testing.assert_array_equal(a, b)
    x2, y2, g2 = _pairs(3, seed=2, groups=True)
    assert r.append(x2, y2, g2) == (10, 13)
    x, y, g = PairStore.open(s.path).read(slice(None))
    np.testing.assert_array_equal(x[:10], before[0])
    np.testing.assert_array_equal(x[10:], x2.astype(np.float32))
    np.testing.assert_array_equal(g[10:], g2)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_append_sigkilled_midway(tmp_path):
    s = _store(tmp_path, n=10)
    before = s.read(slice(None))
    script = textwrap.dedent(f"""
        import os, signal, sys
        import numpy as np
        sys.path.insert(0, {ROOT!r})
        from unicon_dist.data.store import PairStore
        orig = PairStore._write
        def killing(self, name, start, data):
            orig(self, name, start, data)
            if name == "x":
                os.kill(os.getpid(), signal.SIGKILL)
        PairStore._write = killing
        PairStore.open({str(s.path)!r}, mode="r+").append(np.ones((7, {DX})), np.ones((7, {DY})))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    r = PairStore.open(s.path, mode="r+")
    assert len(r) == 10 and len(r.attrs["appends"]) == 1
    for a, b in zip(before, r.read(slice(None))):
        np.testing.assert_array_equal(a, b)
    assert r.append(np.full((2, DX), 3.0), np.full((2, DY), 4.0)) == (10, 12)
    x, y, _ = r.read(slice(None))
    np.testing.assert_array_equal(x[:10], before[0])
    assert (x[10:] == 3).all() and (y[10:] == 4).all()


# ------------------------------------------------------------------ bad input
def _bad(a, row, value=np.nan):
    a = np.array(a, copy=True)
    a[row, 1] = value
    return a


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x=_bad(_pairs(8)[0], [2, 5])), ValueError,
     r"x has non-finite values in rows 12, 15 \(of this append: 2, 5\)"),
    (dict(y=_bad(_pairs(8)[1], 7, np.inf)), ValueError, r"y has non-finite values in rows 17 \(of this append: 7\)"),
    (dict(x=np.ones((8, DX + 1))), ValueError, r"x has 4 columns but the store's dim_x is 3"),
    (dict(y=np.ones((8, DY - 1))), ValueError, r"y has 4 columns but the store's dim_y is 5"),
    (dict(x=np.ones(8)), ValueError, r"x must be 2-D"),
    (dict(y=np.ones((7, DY))), ValueError, r"mismatched number of rows: x has 8, y has 7"),
    (dict(x=np.full((8, DX), "a")), TypeError, r"x must be a numeric array castable to float32, got dtype <U1"),
    (dict(y=np.empty((8, DY), dtype=object)), TypeError, r"y must be a numeric array.*object"),
    (dict(x=np.full((8, DX), 1e39)), ValueError, r"x has values out of range for float32 in rows 10, 11"),
])
def test_bad_append_writes_nothing(tmp_path, kwargs, exc, match):
    s = _store(tmp_path, n=10)
    before = s.read(slice(None))
    x, y = _pairs(8, seed=3)
    args = {"x": x, "y": y, **kwargs}
    with pytest.raises(exc, match=match):
        s.append(args["x"], args["y"])
    assert len(s) == 10 and len(PairStore.open(s.path)) == 10
    assert zarr.open_group(s.path, mode="r")["x"].shape[0] == 10  # validated before any write
    for a, b in zip(before, s.read(slice(None))):
        np.testing.assert_array_equal(a, b)


def test_bad_groups(tmp_path):
    s = _store(tmp_path, n=4, groups=True)
    x, y = _pairs(4)
    with pytest.raises(ValueError, match="has groups: pass groups="):
        s.append(x, y)
    with pytest.raises(TypeError, match="groups must be integer labels, got dtype float64"):
        s.append(x, y, np.zeros(4))
    with pytest.raises(ValueError, match=r"one label per row \(4\), got shape \(3,\)"):
        s.append(x, y, np.zeros(3, dtype=int))
    plain = PairStore.create(tmp_path / "plain.zarr", DX, DY, chunk_rows=CH)
    with pytest.raises(ValueError, match="created without groups"):
        plain.append(x, y, np.zeros(4, dtype=int))
    assert len(s) == 4 and len(plain) == 0


def test_float16_overflow_named(tmp_path):
    s = _store(tmp_path, n=0, dtype="float16")
    x, y = _pairs(3)
    x[1, 0] = 1e6
    with pytest.raises(ValueError, match=r"x has values out of range for float16 in rows 1"):
        s.append(x, y)


def test_read_only_append(tmp_path):
    s = _store(tmp_path, n=2)
    with pytest.raises(PermissionError, match="read-only.*mode='r\\+'"):
        PairStore.open(s.path).append(*_pairs(2))


def test_create_existing_and_open_errors(tmp_path):
    s = _store(tmp_path, n=3)
    with pytest.raises(FileExistsError, match="p.zarr already exists; pass overwrite=True"):
        PairStore.create(s.path, DX, DY)
    fresh = PairStore.create(s.path, DX, DY, overwrite=True)
    assert len(fresh) == 0 and len(PairStore.open(s.path)) == 0
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite .*mine"):
        PairStore.create(other, DX, DY, overwrite=True)
    assert (other / "notes.txt").exists()
    with pytest.raises(FileNotFoundError, match="no pair store at .*missing.zarr"):
        PairStore.open(tmp_path / "missing.zarr")
    with pytest.raises(ValueError, match="mine is not a pair store"):
        PairStore.open(other)
    zarr.open_group(tmp_path / "g.zarr", mode="w", attributes={"format": "something"})
    with pytest.raises(ValueError, match="g.zarr is not a pair store"):
        PairStore.open(tmp_path / "g.zarr")
    zarr.open_group(s.path, mode="r+").update_attributes({"schema_version": 99})
    with pytest.raises(ValueError, match="unknown schema_version 99"):
        PairStore.open(s.path)
    with pytest.raises(ValueError, match="mode must be"):
        PairStore.open(s.path, mode="w")


def test_open_damaged_layout(tmp_path):
    s = _store(tmp_path, n=10, groups=True)
    zarr.open_group(s.path, mode="r+")["y"].resize((6, DY))  # shorter than the committed rows
    with pytest.raises(ValueError, match=r"array 'y' has shape \(6, 5\), expected \(10 or more, 5\)"):
        PairStore.open(s.path)
    s2 = PairStore.create(tmp_path / "q.zarr", DX, DY, groups=True, chunk_rows=CH)
    shutil.rmtree(s2.path / "groups")
    with pytest.raises(ValueError, match="q.zarr: array 'groups' is missing"):
        PairStore.open(s2.path)


@pytest.mark.parametrize("kw,match", [
    (dict(dtype="int8"), "unsupported dtype"), (dict(chunk_rows=0), "chunk_rows"),
    (dict(provenance={"f": object()}), "provenance must be JSON"),
])
def test_bad_create(tmp_path, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PairStore.create(tmp_path / "c.zarr", DX, DY, **kw)
    with pytest.raises(ValueError, match="dim_x must be a positive integer"):
        PairStore.create(tmp_path / "c2.zarr", 0, DY)


# ------------------------------------------------------------------ damaged chunks
@pytest.mark.parametrize("name", ["x", "y", "groups"])
def test_missing_chunk_named(tmp_path, name):
    s = _store(tmp_path, n=10, groups=True)
    f = _chunk_file(s, name, 1)
    assert f.is_file()
    f.unlink()
    r = PairStore.open(s.path)
    key = f"{name}/c/1" + ("/0" if name != "groups" else "")
    msg = rf"pair store .*p.zarr: array '{name}' chunk 1 \(key '{key}', rows 4–7\) is missing or corrupt"
    with pytest.raises(ValueError, match=msg):
        r.read(slice(None))
    with pytest.raises(ValueError, match=msg):
        r.read(np.array([9, 5]))
    with pytest.raises(ValueError, match=msg):
        list(r.iter_blocks())
    r.read(slice(0, 4))  # other chunks still readable
    r.read(np.array([0, 9]))


@pytest.mark.parametrize("damage", ["garbage", "flip"])
def test_corrupt_chunk_named(tmp_path, damage):
    s = _store(tmp_path, n=10)
    f = _chunk_file(s, "y", 2)
    if damage == "garbage":
        f.write_bytes(b"\x00garbage bytes\xff" * 5)
    else:  # one flipped byte inside a valid zstd frame: caught by the frame checksum
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0xFF
        f.write_bytes(bytes(b))
    r = PairStore.open(s.path)
    with pytest.raises(ValueError, match=r"array 'y' chunk 2 \(key 'y/c/2/0', rows 8–9\) is missing or corrupt: .*"):
        r.read(slice(None))
    r.read(slice(0, 8))


def test_non_finite_on_disk_named(tmp_path):
    """Values that bypass append (written by another tool) are reported by chunk."""
    s = _store(tmp_path, n=10)
    zarr.open_group(s.path, mode="r+")["x"][6, 0] = np.nan
    with pytest.raises(ValueError, match=r"array 'x' chunk 1 \(key 'x/c/1/0', rows 4–7\).*non-finite.*\[6\]"):
        PairStore.open(s.path).read(slice(None))


# ------------------------------------------------------------------ labels
def _labelled(tmp_path, n=10, names=("a", "b", "c"), groups=False):
    s = PairStore.create(tmp_path / "l.zarr", DX, DY, groups=groups, chunk_rows=CH, labels=True,
                         label_names=None if names is None else list(names))
    if n:
        x, y = _pairs(n)
        s.append(x, y, np.arange(n) // 2 if groups else None, labels=np.arange(n) % 3)
    return s


@pytest.mark.parametrize("groups", [False, True])
def test_labels_round_trip(tmp_path, groups):
    s = _labelled(tmp_path, n=10, groups=groups)
    assert s.append(*_pairs(3, seed=1), np.zeros(3, int) if groups else None,
                    labels=np.array([2, 2, 0], dtype=np.uint8)) == (10, 13)
    r = PairStore.open(s.path)
    want = np.concatenate([np.arange(10) % 3, [2, 2, 0]])
    assert r.has_labels and r.label_names == ["a", "b", "c"] and "has_labels=True" in repr(r)
    lab = r.read_labels()
    assert lab.dtype == np.int64
    np.testing.assert_array_equal(lab, want)
    np.testing.assert_array_equal(r.read_labels(np.array([12, 0, -1])), want[[12, 0, -1]])
    np.testing.assert_array_equal(r.read_labels(slice(2, 11, 4)), want[2:11:4])
    assert r.read_labels(4) == want[4] and r.read_labels([]).shape == (0,)
    assert len(r.read()) == 3  # read() keeps (x, y, groups)
    assert zarr.open_group(s.path, mode="r")["labels"].chunks == (CH,)
    with pytest.raises(IndexError, match="out of range"):
        r.read_labels(13)


def test_labels_without_names_and_set_later(tmp_path):
    s = _labelled(tmp_path, n=0, names=None)
    assert s.label_names is None
    s.append(*_pairs(6), labels=np.array([0, 1, 7, 1, -2, 0]))  # any int64 while unnamed
    with pytest.raises(ValueError, match=r"committed labels outside \[0, 3\) in rows 2, 4; cannot set 3"):
        s.set_label_names(["a", "b", "c"])
    assert PairStore.open(s.path).label_names is None
    s2 = _labelled(tmp_path / "b", n=10, names=None)
    s2.set_label_names(("u", "v", "w"))
    assert PairStore.open(s2.path).label_names == ["u", "v", "w"]
    s2.set_label_names(None)
    assert PairStore.open(s2.path).label_names is None
    with pytest.raises(PermissionError, match="read-only"):
        PairStore.open(s2.path).set_label_names(["a"])


@pytest.mark.parametrize("labels,exc,match", [
    (None, ValueError, "has labels: pass labels="),
    (np.zeros(8), TypeError, "labels must be integer labels, got dtype float64"),
    (np.zeros(7, int), ValueError, r"labels must be 1-D with one label per row \(8\), got shape \(7,\)"),
    (np.array([0, 1, 2, 3, 0, -1, 0, 0]), ValueError,
     r"labels must lie in \[0, 3\) .*out of range in rows 13, 15 \(of this append: 3, 5\)"),
])
def test_bad_labels_write_nothing(tmp_path, labels, exc, match):
    s = _labelled(tmp_path, n=10)
    before = s.read_labels()
    with pytest.raises(exc, match=match):
        s.append(*_pairs(8, seed=4), labels=labels)
    assert len(s) == 10 and len(PairStore.open(s.path)) == 10
    grp = zarr.open_group(s.path, mode="r")
    assert grp["x"].shape[0] == grp["labels"].shape[0] == 10  # validated before any write
    np.testing.assert_array_equal(PairStore.open(s.path).read_labels(), before)


def test_labels_on_unlabelled_store_and_bad_names(tmp_path):
    s = _store(tmp_path, n=4)
    assert not s.has_labels and s.label_names is None
    with pytest.raises(ValueError, match="created without labels; do not pass labels="):
        s.append(*_pairs(2), labels=[0, 1])
    with pytest.raises(ValueError, match="has no labels"):
        s.read_labels()
    with pytest.raises(ValueError, match="created without labels"):
        s.set_label_names(["a"])
    with pytest.raises(ValueError, match="label_names needs a store with labels=True"):
        PairStore.create(tmp_path / "n.zarr", DX, DY, label_names=["a"])
    for bad, exc in (("abc", TypeError), ([1, 2], TypeError), ([], ValueError)):
        with pytest.raises(exc, match="label_names"):
            PairStore.create(tmp_path / "n.zarr", DX, DY, labels=True, label_names=bad)
    assert len(s) == 4


def test_missing_labels_chunk_named(tmp_path):
    s = _labelled(tmp_path, n=10)
    (s.path / "labels" / "c" / "1").unlink()
    r = PairStore.open(s.path)
    with pytest.raises(ValueError, match=r"array 'labels' chunk 1 \(key 'labels/c/1', rows 4–7\) is missing"):
        r.read_labels()
    with pytest.raises(ValueError, match=r"array 'labels' chunk 1"):
        r.read_labels([5])
    np.testing.assert_array_equal(r.read_labels(slice(0, 4)), np.arange(4) % 3)
    r.read()  # x and y are intact


def test_old_store_without_new_attrs_opens(tmp_path):
    """A store written before labels/aux existed has none of their attributes."""
    s = _store(tmp_path, n=5, groups=True)
    meta_path = s.path / "zarr.json"
    import json
    meta = json.loads(meta_path.read_text())
    for k in ("has_labels", "label_names", "aux", "history"):
        del meta["attributes"][k]
    meta_path.write_text(json.dumps(meta))
    r = PairStore.open(s.path, mode="r+")
    assert not r.has_labels and r.label_names is None and r.array_names() == [] and r.history == []
    r.append(*_pairs(2, groups=True))
    r.put_array("extra", np.ones(3))
    assert len(PairStore.open(s.path)) == 7 and PairStore.open(s.path).array_names() == ["extra"]


# ------------------------------------------------------------------ auxiliary arrays
def test_aux_round_trip_replace_and_delete(tmp_path):
    s = _labelled(tmp_path, n=4)
    emb = np.random.default_rng(0).standard_normal((3, DY))
    s.put_array("label_embeddings_y", emb, attrs={"prompt": "a photo of a {}"})
    s.put_array("counts", np.array([4, 0, 2], dtype=np.int32))
    s.put_array("empty", np.zeros((0, 2)))
    r = PairStore.open(s.path)
    assert r.array_names() == ["counts", "empty", "label_embeddings_y"]
    got = r.get_array("label_embeddings_y")
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, emb)
    assert r.array_attrs("label_embeddings_y") == {"prompt": "a photo of a {}"}
    assert r.get_array("counts").dtype == np.int32 and r.get_array("empty").shape == (0, 2)
    s.put_array("label_embeddings_y", emb[:2] * 2)  # replace: old data deleted after the commit
    np.testing.assert_array_equal(PairStore.open(s.path).get_array("label_embeddings_y"), emb[:2] * 2)
    nodes = sorted(p.name for p in (s.path / "aux").iterdir() if p.is_dir())
    assert len(nodes) == 3 and sum(n.startswith("label_embeddings_y-") for n in nodes) == 1
    s.delete_array("counts")
    assert PairStore.open(s.path).array_names() == ["empty", "label_embeddings_y"]
    with pytest.raises(KeyError, match=r"no auxiliary array 'counts'; it has \['empty', 'label_embeddings_y'\]"):
        PairStore.open(s.path).get_array("counts")
    with pytest.raises(PermissionError, match="read-only"):
        r.put_array("z", np.ones(2))
    assert len(r) == 4 and r.read_labels().shape == (4,)


@pytest.mark.parametrize("name,array,exc,match", [
    ("Bad-Name", np.ones(2), ValueError, r"must match \[a-z0-9_\]\+"),
    ("", np.ones(2), ValueError, "must match"),
    ("labels", np.ones(2), ValueError, "clashes with the store's own arrays"),
    ("x", np.ones(2), ValueError, "clashes"),
    ("emb", np.array([[1.0, np.nan], [0, 0], [np.inf, 1]]), ValueError, r"'emb' has non-finite values in rows \[0, 2\]"),
    ("emb", np.array(["a", "b"]), TypeError, "must be numeric"),
    ("emb", np.float64(1.0), ValueError, "at least one dimension"),
])
def test_aux_bad_input(tmp_path, name, array, exc, match):
    s = _store(tmp_path, n=2)
    s.put_array("keep", np.arange(3.0))
    with pytest.raises(exc, match=match):
        s.put_array(name, array)
    r = PairStore.open(s.path)
    assert r.array_names() == ["keep"]
    assert [p.name.split("-")[0] for p in (s.path / "aux").iterdir() if p.is_dir()] == ["keep"]


def test_aux_bad_attrs(tmp_path):
    s = _store(tmp_path, n=0)
    with pytest.raises(TypeError, match="attrs of auxiliary array 'emb' must be JSON"):
        s.put_array("emb", np.ones(2), attrs={"f": object()})
    assert s.array_names() == []


def test_aux_interrupted_put_keeps_old_version(tmp_path, monkeypatch):
    s = _store(tmp_path, n=2)
    s.put_array("emb", np.ones((2, 3)))

    def dying(self, new):
        raise KeyboardInterrupt("killed before the commit")

    monkeypatch.setattr(PairStore, "_update_attrs", dying)
    with pytest.raises(KeyboardInterrupt):
        s.put_array("emb", np.zeros((5, 3)))
    monkeypatch.undo()
    r = PairStore.open(s.path, mode="r+")
    np.testing.assert_array_equal(r.get_array("emb"), np.ones((2, 3)))  # still the old version
    assert len([p for p in (s.path / "aux").iterdir() if p.is_dir()]) == 2  # the orphan
    r.put_array("other", np.ones(1))  # the next put removes orphans
    assert sorted(p.name.split("-")[0] for p in (s.path / "aux").iterdir() if p.is_dir()) == ["emb", "other"]
    np.testing.assert_array_equal(r.get_array("emb"), np.ones((2, 3)))


def test_aux_missing_or_corrupt_named(tmp_path):
    s = _store(tmp_path, n=2)
    s.put_array("emb", np.arange(6.0).reshape(2, 3))
    path = s.attrs["aux"]["emb"]["path"]
    chunk = s.path / path / "c" / "0" / "0"
    data = chunk.read_bytes()
    chunk.unlink()
    with pytest.raises(ValueError, match=rf"auxiliary array 'emb' \({path}\): chunk file .* not found"):
        PairStore.open(s.path).get_array("emb")
    chunk.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"auxiliary array 'emb' .* is corrupt"):
        PairStore.open(s.path).get_array("emb")
    shutil.rmtree(s.path / path)
    with pytest.raises(ValueError, match=r"auxiliary array 'emb' .* is missing"):
        PairStore.open(s.path).get_array("emb")


def test_history_records(tmp_path):
    s = _store(tmp_path, n=2)
    s.add_history({"kind": "ingest", "rows": [0, 2]})
    assert PairStore.open(s.path).history == [{"kind": "ingest", "rows": [0, 2]}]
    with pytest.raises(TypeError, match="JSON-serialisable"):
        s.add_history({"bad": object()})
    assert len(PairStore.open(s.path).history) == 1


def test_read_groups_alone(tmp_path):
    s = _store(tmp_path, n=10, groups=True)
    g = s.read()[2]
    np.testing.assert_array_equal(s.read_groups(), g)
    np.testing.assert_array_equal(s.read_groups([9, 1]), g[[9, 1]])
    assert s.read_groups(3) == g[3]
    with pytest.raises(ValueError, match="has no groups"):
        _store(tmp_path / "b", n=2).read_groups()
