"""Small real two-view datasets that ship with installed packages (no downloads)."""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

__all__ = [
    "load_digits_halves", "load_fashion_mnist_halves", "FASHION_MNIST_CLASSES", "DIGITS_CLASSES",
    "WORDNET_DIR", "WORDNET_POS", "WORDNET_LEXNAMES", "WordNetSynset", "parse_wordnet_line",
    "iter_wordnet_synsets", "wordnet_definition", "clustered_pairs",
]

DIGITS_CLASSES = tuple(str(d) for d in range(10))


def load_digits_halves():
    """scikit-learn's 8×8 handwritten digits split into left and right image halves.

    The classic two-view benchmark at toy scale: 1,797 images, each view 8×4 = 32
    pixels scaled to [0, 1]; the digit class is returned for class-level retrieval.

    Returns
    -------
    left : ndarray, shape (1797, 32), float32
    right : ndarray, shape (1797, 32), float32
    labels : ndarray, shape (1797,), int64
    """
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    images = images.reshape(-1, 8, 8).astype(np.float32) / 16.0
    left = np.ascontiguousarray(images[:, :, :4].reshape(len(images), -1))
    right = np.ascontiguousarray(images[:, :, 4:].reshape(len(images), -1))
    return left, right, labels.astype(np.int64)


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _read_idx(path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, optionally gzipped) as an ndarray."""
    import gzip
    from pathlib import Path

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def load_fashion_mnist_halves(split: str = "train", directory=FASHION_MNIST_DIR):
    """Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017) images split into left and right halves.

    Read from the files of Debian's ``dataset-fashion-mnist`` package (no download):
    60,000 training and 10,000 test images of 28×28 pixels; each view is 28×14 = 392
    pixels scaled to [0, 1].

    Parameters
    ----------
    split : {"train", "test"}
    directory : path
        Folder holding ``{train,t10k}-{images,labels}-idx*-ubyte.gz``.

    Returns
    -------
    left, right : ndarray, shape (n, 392), float32
    labels : ndarray, shape (n,), int64
        Class indices into :data:`FASHION_MNIST_CLASSES`.
    """
    from pathlib import Path

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    directory = Path(directory)
    images_path = directory / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.is_file():
        raise FileNotFoundError(
            f"{images_path} not found: install Debian's dataset-fashion-mnist package "
            "(apt-get install dataset-fashion-mnist) or pass directory="
        )
    images = _read_idx(images_path).astype(np.float32) / 255.0
    labels = _read_idx(directory / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels")
    half = images.shape[2] // 2
    left = np.ascontiguousarray(images[:, :, :half].reshape(len(images), -1))
    right = np.ascontiguousarray(images[:, :, half:].reshape(len(images), -1))
    return left, right, labels


# ---------------------------------------------------------------------------------- WordNet
WORDNET_DIR = "/usr/share/wordnet"
#: data-file suffix -> synset types allowed in that file (``s`` = adjective satellite)
WORDNET_POS = {"noun": ("n",), "verb": ("v",), "adj": ("a", "s"), "adv": ("r",)}
#: lexicographer file names, indexed by the ``lex_filenum`` field (lexnames(5WN), WordNet 3.0)
WORDNET_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)


class WordNetSynset(NamedTuple):
    """One synset line of a WordNet ``data.<pos>`` file.

    Attributes
    ----------
    pos : str
        The data file it came from: ``"noun"``, ``"verb"``, ``"adj"`` or ``"adv"``.
    offset : int
        Byte offset of the line in that file: WordNet's synset id within one part of speech.
    lex_filenum : int
        Lexicographer file number, an index into :data:`WORDNET_LEXNAMES`.
    ss_type : str
        ``n``, ``v``, ``a``, ``s`` (adjective satellite) or ``r``.
    lemmas : tuple of str
        The synset's words as written in the file (underscores for spaces), with the
        adjective syntactic markers ``(a)``, ``(p)``, ``(ip)`` removed and exact repeats
        dropped (order kept).
    gloss : str
        The full gloss: definition(s), then example sentences in double quotes.
    """

    pos: str
    offset: int
    lex_filenum: int
    ss_type: str
    lemmas: tuple
    gloss: str


_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
# an example sentence starts with a double quote after ';' or ':' (see wordnet_definition)
_EXAMPLE_START = re.compile(r"[;:]\s*\"")


def parse_wordnet_line(line: str, pos: str, where: str = "") -> WordNetSynset:
    """Parse one synset line of a ``data.<pos>`` file (format of wndb(5WN)).

    ``synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id...] p_cnt
    [ptr...] [frames...] | gloss`` with ``w_cnt`` two hex digits, ``p_cnt`` three
    decimal digits, each pointer four fields and, in ``data.verb`` only, ``f_cnt`` verb
    frames of three fields each (``+ f_num w_num``).

    Parameters
    ----------
    line : str
        The line, with or without its newline.
    pos : {"noun", "verb", "adj", "adv"}
        Which data file the line comes from (checks ``ss_type``).
    where : str
        Location used in error messages, e.g. ``"data.noun:1234"``.

    Raises
    ------
    ValueError
        Naming ``where`` and the offending field when the line does not follow the format.
    """
    if pos not in WORDNET_POS:
        raise ValueError(f"pos must be one of {list(WORDNET_POS)}, got {pos!r}")
    head, sep, gloss = line.partition(" | ")
    if not sep:
        raise ValueError(f"{where}: no ' | ' separating the gloss")
    fields = head.split()

    def field(k: int, name: str) -> str:
        if k >= len(fields):
            raise ValueError(f"{where}: line ends before field {name!r}")
        return fields[k]

    def number(k: int, name: str, base: int = 10) -> int:
        text = field(k, name)
        try:
            return int(text, base)
        except ValueError:
            raise ValueError(f"{where}: field {name!r} is {text!r}, not a base-{base} integer") from None

    offset = number(0, "synset_offset")
    lex_filenum = number(1, "lex_filenum")
    if not 0 <= lex_filenum < len(WORDNET_LEXNAMES):
        raise ValueError(f"{where}: lex_filenum {lex_filenum} outside 0..{len(WORDNET_LEXNAMES) - 1}")
    ss_type = field(2, "ss_type")
    if ss_type not in WORDNET_POS[pos]:
        raise ValueError(f"{where}: ss_type {ss_type!r} does not belong in data.{pos}")
    w_cnt = number(3, "w_cnt", 16)
    if w_cnt < 1:
        raise ValueError(f"{where}: synset has w_cnt {w_cnt}, expected at least one word")
    lemmas = []
    for k in range(w_cnt):
        word = _ADJ_MARKER.sub("", field(4 + 2 * k, f"word {k + 1}"))
        number(5 + 2 * k, f"lex_id {k + 1}", 16)
        if word and word not in lemmas:
            lemmas.append(word)
    k = 4 + 2 * w_cnt
    p_cnt = number(k, "p_cnt")
    k += 1 + 4 * p_cnt
    if pos == "verb":
        f_cnt = number(k, "f_cnt")
        k += 1 + 3 * f_cnt
    if k != len(fields):
        raise ValueError(f"{where}: expected {k} fields before the gloss "
                         f"(w_cnt={w_cnt}, p_cnt={p_cnt}), found {len(fields)}")
    return WordNetSynset(pos, offset, lex_filenum, ss_type, tuple(lemmas), gloss.strip())


def iter_wordnet_synsets(pos=("noun", "verb", "adj", "adv"), directory=WORDNET_DIR,
                         check_offsets: bool = True):
    """Yield the synsets of WordNet's ``data.<pos>`` files, file by file in offset order.

    Read from Debian's ``wordnet-base`` package by default (WordNet 3.0, no download).
    License header lines (those starting with two spaces) are skipped.

    Parameters
    ----------
    pos : sequence of {"noun", "verb", "adj", "adv"}
        Data files to read, in this order.
    directory : path
        Folder holding ``data.noun``, ``data.verb``, ``data.adj``, ``data.adv``.
    check_offsets : bool
        Check that each line's ``synset_offset`` equals its byte offset in the file, as
        wndb(5WN) specifies (catches truncated, re-encoded or hand-edited files).

    Yields
    ------
    WordNetSynset
    """
    from pathlib import Path

    if isinstance(pos, str):
        pos = (pos,)
    for p in pos:
        if p not in WORDNET_POS:
            raise ValueError(f"unknown WordNet part of speech {p!r}; expected some of {list(WORDNET_POS)}")
    directory = Path(directory)
    for p in pos:
        path = directory / f"data.{p}"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: install Debian's wordnet-base package "
                "(apt-get install wordnet-base) or pass directory="
            )
        at = 0
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                start, at = at, at + len(raw)
                if raw.startswith(b"  ") or not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{where}: not UTF-8 text ({exc})") from None
                synset = parse_wordnet_line(line, p, where)
                if check_offsets and synset.offset != start:
                    raise ValueError(f"{where}: synset_offset {synset.offset:08d} but the line starts at "
                                     f"byte {start}; the file is not an intact wndb(5WN) data file")
                yield synset


def wordnet_definition(gloss: str) -> str:
    """The definition part of a WordNet gloss, without its example sentences.

    Glosses are ``definition[; definition...]`` followed by examples in double quotes,
    normally introduced by ``;`` and sometimes by ``:``.  The text is cut at the first
    ``;`` or ``:`` followed by a double quote, and trailing separators are removed.
    Quotes inside a definition (``... as in "on behalf of" ...``) are kept.  A gloss
    that would come out empty is returned whole.

    Examples
    --------
    >>> wordnet_definition('a member of the genus Canis; "the dog barked all night"')
    'a member of the genus Canis'
    """
    match = _EXAMPLE_START.search(gloss)
    text = gloss[:match.start()] if match else gloss
    text = text.strip().rstrip(";:,").strip()
    return text or gloss.strip()


def clustered_pairs(n: int = 6000, n_centres: int = 20, dim_x: int = 16, dim_y: int = 12, noise: float = 0.5,
                    seed: int = 0):
    """Synthetic clustered pairs: x = c + noise, y = tanh(c·A) + noise, c one of ``n_centres`` centres.

    The centres are standard normal in ``dim_x`` dims, A is a Gaussian ``dim_x`` × ``dim_y``
    map scaled by 1/√dim_x, and both views get independent Gaussian noise of standard
    deviation ``noise``: within a cluster the pairs cannot be told apart, so instance
    retrieval tops out near 1/cluster size while the cluster is easy (the set the fixed-point
    benchmarks and tests of issue 18 use).

    Returns
    -------
    X : ndarray (n, dim_x), Y : ndarray (n, dim_y), float32
    labels : ndarray (n,) of int64, the centre of each pair
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, dim_x))
    A = rng.standard_normal((dim_x, dim_y)) / np.sqrt(dim_x)
    labels = rng.integers(0, n_centres, n)
    X = centres[labels] + noise * rng.standard_normal((n, dim_x))
    Y = np.tanh(centres[labels] @ A) + noise * rng.standard_normal((n, dim_y))
    return X.astype(np.float32), Y.astype(np.float32), labels.astype(np.int64)
