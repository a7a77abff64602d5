"""Small real two-view datasets that ship with installed packages (no downloads)."""

from __future__ import annotations

import numpy as np

__all__ = ["load_digits_halves", "load_fashion_mnist_halves", "FASHION_MNIST_CLASSES"]


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
