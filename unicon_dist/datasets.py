"""Small real two-view datasets that ship with installed packages (no downloads)."""

from __future__ import annotations

import numpy as np

__all__ = ["load_digits_halves"]


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
