#!/usr/bin/env python
"""scikit-learn's 8×8 digits → a PairStore of left/right image halves.

x = left 8×4 half, y = right 8×4 half (32 pixels each, scaled to [0, 1]), one row per
image in scikit-learn's order; labels = the digit, with label names "0".."9".

    python pipelines/digits.py --out data/digits.zarr [--groups class] [--overwrite]

See ``pipelines/cards/digits.md`` for the dataset card.
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import GROUP_MODES, StagedOutput, base_provenance, class_groups, log, write_labelled_store
from unicon_dist.data.datasets import DIGITS_CLASSES, load_digits_halves
from unicon_dist.data.store import PairStore


def build_digits_store(out, *, groups: str = "none", overwrite: bool = False,
                       dtype: str = "float32", chunk_rows: int | None = None,
                       argv=None) -> PairStore:
    """Write the digits halves to a new pair store at ``out``.

    Parameters
    ----------
    out : path
        Directory of the store; built in ``<out>.partial`` and moved into place at the end.
    groups : {"none", "class"}
        ``"none"``: one-to-one pairs in scikit-learn's row order.  ``"class"``: the digit is
        the positive group; rows are stably sorted by digit (each group contiguous) and the
        original row of each stored row is saved as the auxiliary array ``source_index``.
    overwrite : bool
        Replace an existing pair store at ``out``.
    dtype : {"float32", "float16", "float64"}
        Storage dtype (pixels are multiples of 1/16, exact in every choice).
    chunk_rows : int, optional
        Rows per chunk; default from :class:`~unicon_dist.data.store.PairStore`.
    argv : list of str, optional
        Command line, recorded in the provenance.

    Returns
    -------
    PairStore
        The finished store, opened read-only.
    """
    from sklearn import __version__ as sklearn_version

    t0 = time.perf_counter()
    staged = StagedOutput(out, overwrite)
    left, right, labels = load_digits_halves()
    order, group_ids = class_groups(labels, groups)
    if order is not None:
        left, right, labels = left[order], right[order], labels[order]
    provenance = base_provenance(
        "digits.py", argv,
        dataset="digits",
        source={"loader": "sklearn.datasets.load_digits", "scikit_learn": sklearn_version,
                "original": "UCI Optical Recognition of Handwritten Digits (E. Alpaydin, C. Kaynak, 1998)"},
        views={"x": "left half: columns 0-3 of the 8x8 image, row-major, pixel/16",
               "y": "right half: columns 4-7 of the 8x8 image, row-major, pixel/16"},
        labels="digit 0-9",
        groups=groups,
        row_order="scikit-learn order" if order is None else "stable sort by digit; see array source_index",
    )
    return write_labelled_store(staged, left, right, labels, group_ids, order, label_names=DIGITS_CLASSES,
                                dtype=dtype, chunk_rows=chunk_rows, provenance=provenance,
                                source="sklearn.datasets.load_digits", pipeline="pipelines/digits.py", t0=t0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="pipelines/digits.py",
        description="Write scikit-learn's digits as left/right image halves to a PairStore.")
    parser.add_argument("--out", required=True, help="output store directory, e.g. data/digits.zarr")
    parser.add_argument("--groups", choices=GROUP_MODES, default="none",
                        help="'class': the digit is the positive group (rows sorted by digit); "
                             "default 'none': one-to-one pairs")
    parser.add_argument("--dtype", choices=("float32", "float16", "float64"), default="float32")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        store = build_digits_store(args.out, groups=args.groups, overwrite=args.overwrite, dtype=args.dtype,
                                   argv=sys.argv if argv is None else argv)
    except (ValueError, OSError) as exc:  # e.g. an existing output without --overwrite
        parser.exit(2, f"pipelines/digits.py: error: {exc}\n")
    log(f"digits: {len(store):,} rows (dim_x={store.dim_x}, dim_y={store.dim_y}) -> {store.path} "
        f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
