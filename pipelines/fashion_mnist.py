#!/usr/bin/env python
"""Fashion-MNIST (Debian ``dataset-fashion-mnist``) → one PairStore per split.

x = left 28×14 half, y = right 28×14 half of each image (392 pixels each, scaled to
[0, 1]); labels = class ids with ``label_names`` = :data:`FASHION_MNIST_CLASSES`.

    python pipelines/fashion_mnist.py --out-dir data               # both splits
    python pipelines/fashion_mnist.py --split train --out data/fashion-mnist-train.zarr

See ``pipelines/cards/fashion_mnist.md`` for the dataset card.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import (GROUP_MODES, StagedOutput, base_provenance, class_groups, debian_package_version, log,
                     sha256_file, write_labelled_store)
from unicon_dist.data.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist_halves
from unicon_dist.data.store import PairStore

SPLITS = ("train", "test")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def build_fashion_mnist_store(out, split: str = "train", *, directory=FASHION_MNIST_DIR,
                              groups: str = "none", overwrite: bool = False, dtype: str = "float32",
                              chunk_rows: int | None = None, argv=None) -> PairStore:
    """Write one Fashion-MNIST split to a new pair store at ``out``.

    Parameters
    ----------
    out : path
        Directory of the store; built in ``<out>.partial`` and moved into place at the end.
    split : {"train", "test"}
        60,000 training or 10,000 test images (Debian package files).
    directory : path
        Folder of the IDX files (default: where ``dataset-fashion-mnist`` installs them).
    groups : {"none", "class"}
        ``"none"``: one-to-one pairs in file order.  ``"class"``: the class is the positive
        group; rows are stably sorted by class (each group contiguous) and the file index
        of each stored row is saved as the auxiliary array ``source_index``.
    overwrite : bool
        Replace an existing pair store at ``out``.
    dtype : {"float32", "float16", "float64"}
        Storage dtype.  float16 rounds pixel values (k/255 is not exact in float16).
    chunk_rows : int, optional
        Rows per chunk; default from :class:`~unicon_dist.data.store.PairStore`.
    argv : list of str, optional
        Command line, recorded in the provenance.

    Returns
    -------
    PairStore
        The finished store, opened read-only.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    t0 = time.perf_counter()
    staged = StagedOutput(out, overwrite)
    directory = Path(directory)
    # the whole split is 188 MB of float32 at most: it is read at once, and written in blocks
    left, right, labels = load_fashion_mnist_halves(split, directory)
    order, group_ids = class_groups(labels, groups)
    if order is not None:
        left, right, labels = left[order], right[order], labels[order]
    provenance = base_provenance(
        "fashion_mnist.py", argv,
        dataset="fashion-mnist",
        split=split,
        source={"debian_package": "dataset-fashion-mnist",
                "debian_version": debian_package_version("dataset-fashion-mnist"),
                "directory": str(directory.resolve()),
                "files": {name: sha256_file(directory / name) for name in _FILES[split]},
                "original": "Xiao, Rasul & Vollgraf (2017), arXiv:1708.07747, Zalando Research"},
        views={"x": "left half: columns 0-13 of the 28x28 image, row-major, pixel/255",
               "y": "right half: columns 14-27 of the 28x28 image, row-major, pixel/255"},
        labels="class id, index into label_names",
        groups=groups,
        row_order="file order" if order is None else "stable sort by class; see array source_index",
    )
    log(f"fashion-mnist {split}: {len(labels):,} rows -> {staged.out}")
    return write_labelled_store(staged, left, right, labels, group_ids, order, label_names=FASHION_MNIST_CLASSES,
                                dtype=dtype, chunk_rows=chunk_rows, provenance=provenance,
                                source=f"fashion-mnist {split}", pipeline="pipelines/fashion_mnist.py", t0=t0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="pipelines/fashion_mnist.py",
        description="Write Fashion-MNIST (Debian dataset-fashion-mnist) as left/right image halves "
                    "to one PairStore per split.")
    parser.add_argument("--split", choices=SPLITS + ("all",), default="all",
                        help="which split to build (default: all, i.e. train and test)")
    parser.add_argument("--out", help="output store directory (only with a single --split)")
    parser.add_argument("--out-dir", default="data",
                        help="folder for fashion-mnist-{train,test}.zarr when --out is not given "
                             "(default: data)")
    parser.add_argument("--directory", default=FASHION_MNIST_DIR,
                        help=f"folder of the IDX .gz files (default: {FASHION_MNIST_DIR})")
    parser.add_argument("--groups", choices=GROUP_MODES, default="none",
                        help="'class': the class is the positive group (rows sorted by class); "
                             "default 'none': one-to-one pairs")
    parser.add_argument("--dtype", choices=("float32", "float16", "float64"), default="float32")
    parser.add_argument("--overwrite", action="store_true", help="replace existing stores")
    args = parser.parse_args(argv)
    splits = SPLITS if args.split == "all" else (args.split,)
    if args.out and len(splits) > 1:
        parser.error("--out names one store: pass --split train or --split test, or use --out-dir")
    for split in splits:
        out = args.out or Path(args.out_dir) / f"fashion-mnist-{split}.zarr"
        t0 = time.perf_counter()
        try:
            store = build_fashion_mnist_store(out, split, directory=args.directory, groups=args.groups,
                                              overwrite=args.overwrite, dtype=args.dtype,
                                              argv=sys.argv if argv is None else argv)
        except (ValueError, OSError) as exc:  # missing or malformed IDX files, existing output
            parser.exit(2, f"pipelines/fashion_mnist.py: error: {exc}\n")
        log(f"fashion-mnist {split}: {len(store):,} rows (dim_x={store.dim_x}, dim_y={store.dim_y}) "
            f"-> {store.path} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
