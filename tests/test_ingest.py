"""ingest: every source type round-trips; bad input is caught before writing or per block."""

import io
import json

import dask.array as da
import numpy as np
import pytest
import zarr

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from unicon_dist.apps.cli import main  # noqa: E402
from unicon_dist.data.ingest import IngestError, _RowProgress, ingest, open_source  # noqa: E402
from unicon_dist.data.store import PairStore  # noqa: E402

N, DX, DY, CH = 30, 3, 5, 4  # 4 rows per chunk, blocks of 8 rows: several blocks per ingest
KW = dict(chunk_rows=CH, block_rows=8, progress=False)


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    return {"x": rng.standard_normal((N, DX)), "y": rng.standard_normal((N, DY)).astype(np.float32),
            "groups": rng.integers(0, 6, N), "labels": rng.integers(0, 3, N).astype(np.int32)}


def _check(store, data, groups=False, labels=False):
    x, y, g = PairStore.open(store.path).read()
    np.testing.assert_array_equal(x, data["x"].astype(np.float32))
    np.testing.assert_array_equal(y, data["y"])
    if groups:
        np.testing.assert_array_equal(g, data["groups"])
    if labels:
        np.testing.assert_array_equal(store.read_labels(), data["labels"])


def _parquet(path, data, row_group_size=7, fixed=False):
    t = lambda d: pa.list_(pa.float32(), d) if fixed else pa.list_(pa.float32())  # noqa: E731
    table = pa.table({"emb": pa.array(list(data["y"]), type=t(DY)),
                      **{f"f{j}": data["x"][:, j] for j in range(DX)},
                      "group": data["groups"], "label": data["labels"]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


# ------------------------------------------------------------------ round trips per source type
def test_npy(tmp_path, data):
    np.save(tmp_path / "x.npy", data["x"])
    np.save(tmp_path / "y.npy", data["y"])
    store = ingest(tmp_path / "x.npy", str(tmp_path / "y.npy"), tmp_path / "s.zarr", **KW)
    _check(store, data)
    assert store.chunk_rows == CH and store.dtype == "float32"
    assert [e["rows"] for e in store.attrs["appends"]] == [[0, 8], [8, 16], [16, 24], [24, 30]]


def test_npy_into_bfloat16(tmp_path, data):
    import torch

    np.save(tmp_path / "x.npy", data["x"])
    np.save(tmp_path / "y.npy", data["y"])
    store = ingest(tmp_path / "x.npy", tmp_path / "y.npy", tmp_path / "s.zarr", dtype="bfloat16", chunk_rows=CH)
    x, y, _ = store.read(slice(None))
    assert store.dtype == "bfloat16"
    np.testing.assert_array_equal(x, torch.tensor(data["x"]).to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(y, torch.tensor(data["y"]).to(torch.bfloat16).float().numpy())


def test_npy_fortran_order_and_offsets(tmp_path, data):
    np.save(tmp_path / "x.npy", np.asfortranarray(data["x"]))
    src = open_source(tmp_path / "x.npy", "x")
    np.testing.assert_array_equal(src.to_dask(5, (8, 8)).compute(), data["x"][5:21])
    store = ingest(tmp_path / "x.npy", data["y"], tmp_path / "s.zarr", **KW)
    _check(store, data)
    np.save(tmp_path / "be.npy", data["x"].astype(">f8"))  # non-native byte order, read by pread
    np.testing.assert_array_equal(open_source(tmp_path / "be.npy", "x").array[3:7], data["x"][3:7])
    np.savez_compressed(tmp_path / "f.npz", x=np.asfortranarray(data["x"]))
    with pytest.raises(ValueError, match="compressed Fortran-order array cannot be read by rows"):
        open_source(tmp_path / "f.npz", "x")


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_members(tmp_path, data, save):
    save(tmp_path / "a.npz", x=data["x"], y=data["y"], g=data["groups"], lab=data["labels"])
    save(tmp_path / "only.npz", data["x"])
    p = tmp_path / "a.npz"
    store = ingest(tmp_path / "only.npz", f"{p}:y", tmp_path / "s.zarr", groups=f"{p}:g", labels=f"{p}:lab", **KW)
    _check(store, data, groups=True, labels=True)
    with pytest.raises(ValueError, match=r"holds 4 arrays \['x', 'y', 'g', 'lab'\]; name one"):
        open_source(p, "x")
    with pytest.raises(ValueError, match=r"has no array 'z'; it has"):
        open_source(f"{p}:z", "x")


@pytest.mark.parametrize("fixed", [False, True])
def test_parquet_list_and_numeric_columns(tmp_path, data, fixed):
    p = _parquet(tmp_path / "t.parquet", data, fixed=fixed)
    store = ingest(f"{p}:f0,f1,f2", f"{p}:emb", tmp_path / "s.zarr", groups=f"{p}:group",
                   labels=f"{p}:label", label_names=["a", "b", "c"], **KW)
    _check(store, data, groups=True, labels=True)
    assert store.label_names == ["a", "b", "c"]
    single = open_source(f"{p}:f1", "x")
    assert single.shape == (N, 1)
    np.testing.assert_array_equal(single.array[3:9], data["x"][3:9, 1:2])
    with pytest.raises(ValueError, match="list column 'emb' must be the only column named"):
        open_source(f"{p}:*", "x")
    pq.write_table(pa.table({f"f{j}": data["x"][:, j] for j in range(DX)}), tmp_path / "n.parquet")
    every = open_source(f"{tmp_path / 'n.parquet'}:*", "x")
    assert every.shape == (N, DX)
    np.testing.assert_array_equal(every.array[:], data["x"])


def test_parquet_bad_columns(tmp_path, data):
    p = _parquet(tmp_path / "t.parquet", data)
    with pytest.raises(ValueError, match=r"has columns \['emb', 'f0'.*name them as"):
        open_source(p, "x")
    with pytest.raises(ValueError, match="has no column 'nope'"):
        open_source(f"{p}:f0,nope", "x")
    with pytest.raises(TypeError, match="groups must be a column of integers, got a list column 'emb'"):
        open_source(f"{p}:emb", "groups")
    with pytest.raises(TypeError, match=r"labels \(.*\): labels must be integers, got dtype float64"):
        open_source(f"{p}:f0", "labels")


def test_zarr_sources(tmp_path, data):
    grp = zarr.open_group(tmp_path / "feat.zarr", mode="w")
    grp.create_array("img/x", shape=(N, DX), chunks=(7, 2), dtype="float64")[:] = data["x"]
    zarr.open_array(tmp_path / "y.zarr", mode="w", shape=(N, DY), chunks=(5, DY), dtype="float32")[:] = data["y"]
    zarr.open_array(tmp_path / "g2.zarr", mode="w", shape=(N,), chunks=(9,), dtype="int64",
                    zarr_format=2)[:] = data["groups"]
    store = ingest(f"{tmp_path / 'feat.zarr'}:img/x", tmp_path / "y.zarr", tmp_path / "s.zarr",
                   groups=tmp_path / "g2.zarr", **KW)
    _check(store, data, groups=True)
    with pytest.raises(ValueError, match="no Zarr array at .*feat.zarr key 'nope'"):
        open_source(f"{tmp_path / 'feat.zarr'}:nope", "x")


def test_pair_store_source_gives_committed_rows(tmp_path, data):
    src = PairStore.create(tmp_path / "src.zarr", DX, DY, chunk_rows=CH)
    src.append(data["x"][:10], data["y"][:10])
    zarr.open_group(src.path, mode="r+")["x"].resize((14, DX))  # uncommitted rows past n_rows
    store = ingest(f"{src.path}:x", src.path / "y", tmp_path / "s.zarr", **KW)
    assert len(store) == 10
    np.testing.assert_array_equal(store.read()[0], data["x"][:10].astype(np.float32))
    with pytest.raises(ValueError, match="lies inside the target store"):
        ingest(f"{src.path}:x", f"{src.path}:y", src.path, append=True, **KW)


def test_in_memory_arrays_and_dtype(tmp_path, data):
    store = ingest(da.from_array(data["x"], chunks=(11, DX)), data["y"], tmp_path / "s.zarr",
                   dtype="float16", **KW)
    x, y, _ = store.read()
    assert x.dtype == np.float16
    np.testing.assert_array_equal(x, data["x"].astype(np.float16))


# ------------------------------------------------------------------ checks before writing
def test_row_count_mismatch_names_both(tmp_path, data):
    np.save(tmp_path / "x.npy", data["x"])
    np.save(tmp_path / "y.npy", data["y"][:-2])
    with pytest.raises(ValueError, match=r"x \(.*x.npy\) has 30, y \(.*y.npy\) has 28"):
        ingest(tmp_path / "x.npy", tmp_path / "y.npy", tmp_path / "s.zarr", **KW)
    np.save(tmp_path / "g.npy", data["groups"][:5])
    with pytest.raises(ValueError, match=r"groups \(.*g.npy\) has 5"):
        ingest(tmp_path / "x.npy", data["y"], tmp_path / "s.zarr", groups=tmp_path / "g.npy", **KW)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("x,exc,match", [
    (np.ones(N), ValueError, r"x \(<ndarray \(30,\)>\): must be 2-D"),
    (np.full((N, DX), "a"), TypeError, "must be numeric, got dtype <U1"),
])
def test_bad_shapes_and_types(tmp_path, data, x, exc, match):
    with pytest.raises(exc, match=match):
        ingest(x, data["y"], tmp_path / "s.zarr", **KW)
    with pytest.raises(TypeError, match="groups must be integers"):
        ingest(data["x"], data["y"], tmp_path / "s.zarr", groups=np.zeros(N), **KW)
    assert not (tmp_path / "s.zarr").exists()


def test_missing_and_unknown_sources(tmp_path, data):
    with pytest.raises(FileNotFoundError, match="no such file: .*nope.npy"):
        ingest(tmp_path / "nope.npy", data["y"], tmp_path / "s.zarr", **KW)
    with pytest.raises(FileNotFoundError, match=r"no such file: .*nope.npz \(from source"):
        open_source(f"{tmp_path / 'nope.npz'}:x", "x")
    (tmp_path / "a.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="unknown source type '.csv'"):
        open_source(tmp_path / "a.csv", "x")
    np.save(tmp_path / "o.npy", np.array([{}], dtype=object))
    with pytest.raises(TypeError, match=r"x \(.*o.npy\): object arrays are not supported"):
        open_source(tmp_path / "o.npy", "x")
    (tmp_path / "t.npy").write_bytes((tmp_path / "o.npy").read_bytes()[:20])
    with pytest.raises(ValueError, match="cannot read .*t.npy as .npy"):
        open_source(tmp_path / "t.npy", "x")
    np.save(tmp_path / "cut.npy", np.ones((N, DX)))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"cut.npy is truncated: .* shape \(30, 3\) float64 needs"):
        open_source(tmp_path / "cut.npy", "x")


def test_append_checks(tmp_path, data):
    s = ingest(data["x"][:10], data["y"][:10], tmp_path / "s.zarr", **KW)
    with pytest.raises(FileExistsError, match="already exists; pass append=True"):
        ingest(data["x"], data["y"], s.path, **KW)
    with pytest.raises(ValueError, match=r"y \(.*\): has 4 columns but pair store .* has dim_y 5"):
        ingest(data["x"], data["y"][:, :4], s.path, append=True, **KW)
    with pytest.raises(ValueError, match="created without groups; do not pass a groups source"):
        ingest(data["x"], data["y"], s.path, append=True, groups=data["groups"], **KW)
    with pytest.raises(ValueError, match="dtype float64 differs"):
        ingest(data["x"], data["y"], s.path, append=True, dtype="float64", **KW)
    with pytest.raises(ValueError, match="exclude each other"):
        ingest(data["x"], data["y"], s.path, append=True, overwrite=True, **KW)
    assert len(PairStore.open(s.path)) == 10 and len(PairStore.open(s.path).attrs["appends"]) == 2
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "f.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        ingest(data["x"], data["y"], tmp_path / "keep", overwrite=True, **KW)


def test_append_aligns_blocks_to_chunks(tmp_path, data):
    s = ingest(data["x"][:5], data["y"][:5], tmp_path / "s.zarr", **KW)
    s = ingest(data["x"][5:], data["y"][5:], s.path, append=True, **KW)
    _check(s, data)
    # the first block of the second run only fills up to row 8, then whole 8-row blocks
    assert [e["rows"] for e in s.attrs["appends"]] == [[0, 5], [5, 8], [8, 16], [16, 24], [24, 30]]
    assert [h["rows"] for h in s.history] == [[0, 5], [5, 30]]


# ------------------------------------------------------------------ per-block failures
def test_nan_row_names_file_and_row_and_keeps_earlier_blocks(tmp_path, data):
    bad = data["x"].copy()
    bad[[19, 21], 1] = np.nan
    np.save(tmp_path / "x.npy", bad)
    with pytest.raises(IngestError, match=r"x \(.*x.npy\): non-finite values in rows 19, 21\n"
                                          r"ingest stopped at source row 16: 16 rows .* start_row=16") as info:
        ingest(tmp_path / "x.npy", data["y"], tmp_path / "s.zarr", labels=data["labels"], **KW)
    assert (info.value.resume_row, info.value.rows_committed) == (16, 16)
    s = PairStore.open(tmp_path / "s.zarr", mode="r+")
    assert len(s) == 16
    np.testing.assert_array_equal(s.read()[0], data["x"][:16].astype(np.float32))
    np.testing.assert_array_equal(s.read_labels(), data["labels"][:16])
    assert s.history[-1]["status"].startswith("failed at source row 16")
    # fix the rows and resume where the error said
    np.save(tmp_path / "x.npy", data["x"])
    s = ingest(tmp_path / "x.npy", data["y"], s.path, labels=data["labels"], append=True,
               start_row=info.value.resume_row, **KW)
    _check(s, data, labels=True)
    assert s.history[-1]["status"] == "complete" and s.history[-1]["start_row"] == 16


def test_parquet_null_and_ragged_rows_named(tmp_path, data):
    rows = [list(r) for r in data["y"]]
    rows[12] = rows[12][:-1]
    pq.write_table(pa.table({"emb": pa.array(rows, type=pa.list_(pa.float32()))}), tmp_path / "r.parquet",
                   row_group_size=7)
    with pytest.raises(IngestError, match=r"y \(.*r.parquet\): rows must all hold 5 values .* lengths \[4\] "
                                          r"in rows 12\n.*start_row=8"):
        ingest(data["x"], tmp_path / "r.parquet", tmp_path / "s.zarr", **KW)
    assert len(PairStore.open(tmp_path / "s.zarr")) == 8
    rows = [list(r) for r in data["y"]]
    rows[3][2] = None
    pq.write_table(pa.table({"emb": pa.array(rows, type=pa.list_(pa.float32()))}), tmp_path / "n.parquet")
    with pytest.raises(IngestError, match=r"null \(missing\) values in rows 3\n.*before committing any row"):
        ingest(data["x"], tmp_path / "n.parquet", tmp_path / "s.zarr", overwrite=True, **KW)
    labels = pa.array([0, 1, None] + [0] * (N - 3), type=pa.int64())
    pq.write_table(pa.table({"label": labels}), tmp_path / "l.parquet")
    with pytest.raises(IngestError, match=r"labels \(.*l.parquet\): null \(missing\) values in column 'label', rows 2"):
        ingest(data["x"], data["y"], tmp_path / "s.zarr", labels=tmp_path / "l.parquet", overwrite=True, **KW)


def test_labels_outside_names_and_float16_range(tmp_path, data):
    labels = data["labels"].copy()
    labels[[9, 26]] = [3, -1]
    np.save(tmp_path / "lab.npy", labels)
    with pytest.raises(IngestError, match=r"labels \(.*lab.npy\): labels outside \[0, 3\) .* rows 9: values \[3\]"):
        ingest(data["x"], data["y"], tmp_path / "s.zarr", labels=tmp_path / "lab.npy",
               label_names=["a", "b", "c"], **KW)
    assert len(PairStore.open(tmp_path / "s.zarr")) == 8
    x = data["x"].copy()
    x[4, 0] = 1e6
    with pytest.raises(IngestError, match=r"x \(.*\): values out of range for float16 in rows 4"):
        ingest(x, data["y"], tmp_path / "h.zarr", dtype="float16", **KW)


def test_empty_sources_make_empty_store(tmp_path):
    s = ingest(np.zeros((0, DX)), np.zeros((0, DY)), tmp_path / "s.zarr", **KW)
    assert len(s) == 0 and s.history[-1]["status"] == "complete"


# ------------------------------------------------------------------ provenance and progress
def test_provenance_recorded(tmp_path, data):
    np.save(tmp_path / "x.npy", data["x"])
    s = ingest(tmp_path / "x.npy", data["y"], tmp_path / "s.zarr", provenance={"encoder": "clip"},
               command="make-features", **KW)
    prov = PairStore.open(s.path).provenance
    assert prov["encoder"] == "clip" and prov["ingest"]["command"] == "make-features"
    xs = prov["ingest"]["sources"]["x"]
    assert xs["path"] == str((tmp_path / "x.npy").resolve()) and xs["format"] == "npy"
    assert xs["bytes"] == (tmp_path / "x.npy").stat().st_size and xs["shape"] == [N, DX] and xs["dtype"] == "float64"
    assert "mtime" in xs and "time" in prov["ingest"]
    json.dumps(s.history)


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


def test_progress_lines():
    t = iter(range(100))
    log = _Stream(tty=False)
    p = _RowProgress(log, clock=lambda: float(next(t)))
    for done in range(0, 1001, 50):
        p("ingest", done, 1000)
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("ingest: 1,000/1,000 rows (100%)") and "rows/s" in lines[-1]
    term = _Stream(tty=True)
    p = _RowProgress(term, clock=lambda: float(next(t)))
    for done in (0, 10, 20):
        p("ingest", done, 20)
    out = term.getvalue()
    assert out.startswith("\r") and out.endswith("20/20 rows (100%), 10 rows/s, 2.0s\n") and out.count("\n") == 1


@pytest.mark.parametrize("block_rows,done", [(8, (0, 8, 16, 24, 30)), (6, (0, 6, 12, 18, 24, 30))])
def test_progress_callable(tmp_path, data, caplog, block_rows, done):
    """block_rows is used as given; one that is not a multiple of chunk_rows gets a warning."""
    calls = []
    with caplog.at_level("WARNING", logger="unicon_dist.data.ingest"):
        s = ingest(data["x"], data["y"], tmp_path / "s.zarr", chunk_rows=CH, block_rows=block_rows,
                   progress=lambda *a: calls.append(a))
    assert calls == [("ingest", d, N) for d in done]
    assert s.history[-1]["block_rows"] == block_rows
    warned = [r.getMessage() for r in caplog.records if r.name == "unicon_dist.data.ingest"]
    assert warned == ([] if block_rows % CH == 0 else
                      ["block_rows 6 is not a multiple of the store's chunk_rows 4: blocks of 6 rows are used as "
                       "given, but each block boundary inside a chunk rewrites that chunk; block_rows 4 would "
                       "write whole chunks"])
    _check(s, data)


# ------------------------------------------------------------------ CLI
def test_cli(tmp_path, data, capsys):
    np.save(tmp_path / "x.npy", data["x"])
    np.savez(tmp_path / "y.npz", y=data["y"], lab=data["labels"])
    (tmp_path / "names.txt").write_text("zero\none, with comma\n\ntwo\n")
    out = tmp_path / "s.zarr"
    argv = ["ingest", str(tmp_path / "x.npy"), f"{tmp_path / 'y.npz'}:y", "--out", str(out),
            "--labels", f"{tmp_path / 'y.npz'}:lab", "--chunk-rows", "4", "--block-rows", "8", "--no-progress"]
    assert main(argv + ["--label-names-file", str(tmp_path / "names.txt")]) == 0
    assert "wrote rows 0-29 (30 rows) in blocks of 8 rows" in capsys.readouterr().out
    s = PairStore.open(out)
    _check(s, data, labels=True)
    assert s.label_names == ["zero", "one, with comma", "two"]
    assert s.provenance["ingest"]["command"][:2] == ["unicon-dist", "ingest"]
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(argv + ["--append", "--label-names", "zero,one"]) == 2
    assert "label_names differ" in capsys.readouterr().err
    assert main(argv + ["--append", "--start-row", "20"]) == 0
    assert len(PairStore.open(out)) == 40
    assert main(["ingest", str(tmp_path / "x.npy"), str(tmp_path / "y.npz"), "--out", str(tmp_path / "t.zarr")]) == 2
    assert "y.npz holds 2 arrays ['y', 'lab']; name one" in capsys.readouterr().err
    assert not (tmp_path / "t.zarr").exists()
    with pytest.raises(SystemExit):
        main(["ingest", "a.npy", "b.npy", "--out", "s", "--append", "--overwrite"])
