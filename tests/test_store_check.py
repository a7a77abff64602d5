"""check_store / ``unicon-dist check-store``: a sound store passes, and each kind of damage is found and named."""

import json

import numpy as np
import pytest
import zarr

from unicon_dist.apps.cli import main
from unicon_dist.data.store import LOCK_FILE, PairStore
from unicon_dist.data.store_check import check_store

DX, DY, CH = 3, 5, 4
HEX = "0123456789abcdef" * 2


@pytest.fixture
def store(tmp_path):
    """14 rows (4 chunks, the last one partly filled), with groups, labels and one auxiliary array."""
    s = PairStore.create(tmp_path / "p.zarr", DX, DY, chunk_rows=CH, groups=True, labels=True,
                         label_names=["a", "b", "c"])
    rng = np.random.default_rng(0)
    s.append(rng.standard_normal((14, DX)), rng.standard_normal((14, DY)), np.arange(14) // 2,
             labels=np.arange(14) % 3)
    s.put_array("emb", rng.standard_normal((3, DY)))
    return s


def _kinds(report):
    return [p.kind for p in report.problems]


def test_clean_store_passes(store, capsys):
    rep = check_store(store.path)
    assert rep.ok and rep.problems == [] and rep.n_rows == 14 and rep.chunk_rows == CH
    assert rep.row_arrays == ["x", "y", "groups", "labels"] and rep.chunks_checked == 16 and rep.aux_arrays == ["emb"]
    assert main(["check-store", str(store.path)]) == 0
    out = capsys.readouterr().out
    assert "rows: 14 committed" in out and "16 chunks" in out and "1 auxiliary array (emb)" in out
    assert out.rstrip().endswith("result: OK")
    assert main(["check-store", "--json", str(store.path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["chunks_checked"] == 16 and doc["problems"] == []
    assert (store.path / LOCK_FILE).exists()  # expected, not stray


def test_deleted_chunk(store, capsys):
    (store.path / "y" / "c" / "2" / "0").unlink()
    rep = check_store(store.path)
    assert _kinds(rep) == ["missing-chunk"]
    p = rep.problems[0]
    assert (p.array, p.chunk, p.key, p.rows) == ("y", 2, "y/c/2/0", [8, 11])
    assert p.message == "array 'y' chunk 2 (key 'y/c/2/0', rows 8\u201311): chunk file not found"
    assert rep.chunks_checked == 16  # the other chunks were still read
    assert main(["check-store", str(store.path)]) == 1
    out = capsys.readouterr().out
    assert "missing-chunk: array 'y' chunk 2 (key 'y/c/2/0', rows 8\u201311)" in out and "DAMAGED (1 problem)" in out


def test_flipped_byte(store):
    f = store.path / "groups" / "c" / "3"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF  # inside the zstd frame: its checksum catches it
    f.write_bytes(bytes(b))
    rep = check_store(store.path)
    assert _kinds(rep) == ["corrupt-chunk"]
    assert (rep.problems[0].array, rep.problems[0].key, rep.problems[0].rows) == ("groups", "groups/c/3", [12, 13])


def test_partial_and_unregistered_aux_and_unknown_file(store):
    (store.path / "x" / "c" / "1" / f"0.{HEX}.partial").write_bytes(b"half a chunk")
    zarr.open_group(store.path, mode="r+").require_group("aux").create_array("emb-0000deadbeef", shape=(2,),
                                                                             dtype="f8")
    (store.path / "notes.txt").write_text("who put this here")
    (store.path / "zarr..partial").write_text("not a zarr temporary: unknown")
    rep = check_store(store.path)
    assert sorted(_kinds(rep)) == ["stray-aux", "stray-file", "stray-file", "stray-partial"]
    by = {p.kind: p for p in rep.problems}
    assert [p.key for p in rep.problems if p.kind == "stray-file"] == ["notes.txt", "zarr..partial"]
    assert by["stray-partial"].key == f"x/c/1/0.{HEX}.partial"
    assert by["stray-aux"].key == "aux/emb-0000deadbeef" and "not in the registry" in by["stray-aux"].message
    PairStore.open(store.path, "r+").put_array("other", np.ones(2))  # a writer removes its own kind of litter
    assert [p.key for p in check_store(store.path).problems] == ["notes.txt", "zarr..partial"]  # not others'


def test_n_rows_larger_than_the_arrays(store, capsys):
    zarr.open_group(store.path, mode="r+").update_attributes({"n_rows": 20})
    rep = check_store(store.path)
    short = [p for p in rep.problems if p.kind == "short-array"]
    assert [p.array for p in short] == ["x", "y", "groups", "labels"]
    assert short[0].message == "array 'x' has 14 rows but n_rows is 20: committed rows 14\u201319 are not stored"
    assert short[0].rows == [14, 19]
    assert main(["check-store", str(store.path)]) == 1
    assert "short-array: array 'labels' has 14 rows" in capsys.readouterr().out


def test_missing_aux_chunk_and_bad_registry_shape(store):
    entry = store.attrs["aux"]["emb"]
    (store.path / entry["path"] / "c" / "0" / "0").unlink()
    rep = check_store(store.path)
    assert _kinds(rep) == ["aux"] and "auxiliary array 'emb'" in rep.problems[0].message
    assert "not found" in rep.problems[0].message and rep.problems[0].key == entry["path"]


def test_non_finite_and_labels_out_of_range_on_disk(store):
    grp = zarr.open_group(store.path, mode="r+")
    grp["x"][5, 1] = np.inf  # written around append, which would refuse both
    grp["labels"][9] = 7
    rep = check_store(store.path)
    assert sorted(_kinds(rep)) == ["label-range", "non-finite"]
    by = {p.kind: p for p in rep.problems}
    assert (by["non-finite"].array, by["non-finite"].chunk, by["non-finite"].key) == ("x", 1, "x/c/1/0")
    assert "labels outside [0, 3) (the store's label_names) in rows 9: values [7]" in by["label-range"].message
    assert by["label-range"].key == "labels/c/2"


def test_bad_schema_attribute(store):
    zarr.open_group(store.path, mode="r+").update_attributes({"chunk_rows": 0, "has_labels": "yes"})
    rep = check_store(store.path)
    assert _kinds(rep) == ["schema", "schema"] and rep.chunks_checked == 0
    assert "chunk_rows is 0" in rep.problems[0].message and "has_labels is 'yes'" in rep.problems[1].message


def test_not_a_pair_store_exits_2(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    zarr.open_group(tmp_path / "other.zarr", mode="w", attributes={"format": "something"})
    for path, msg in ((tmp_path / "plain", "is not a pair store (no zarr.json)"),
                      (tmp_path / "other.zarr", "is not a pair store (format attribute 'something')"),
                      (tmp_path / "missing", "no pair store at")):
        assert main(["check-store", str(path)]) == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a pair store"):
        check_store(tmp_path / "plain")


def test_running_writer_is_noted_and_its_temporaries_are_not_damage(store):
    writer = PairStore.open(store.path, "r+")
    with writer._writing("append"):  # a writer mid-append, with a zarr temporary in flight
        (store.path / "x" / "c" / "3" / f"0.{HEX}.partial").write_bytes(b"in flight")
        rep = check_store(store.path)  # does not wait for the lock
    assert rep.ok and any(n.startswith("a writer is running: the lock is held by pid") for n in rep.notes)
    assert any(f"x/c/3/0.{HEX}.partial: a write temporary" in n for n in rep.notes)
    assert not check_store(store.path).ok  # once it is gone, the temporary is litter
