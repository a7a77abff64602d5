"""Comparison methods a user weighs UniCon against, as scikit-learn-style estimators.

- :class:`RegularizedCCA` -- ridge-regularised canonical correlation analysis (closed form);
- :class:`SGDCLIP` -- linear projection heads trained with minibatch AdamW on the symmetric
  InfoNCE (CLIP) loss, early-stopped on validation retrieval; :func:`sgd_clip_sweep` tunes
  its learning rate and temperature;
- :class:`BatchAveragedUniCon` -- UniCon solved per batch and the batch maps averaged with
  validation weights, the procedure of the UniCon authors' code.

Each has ``fit(X, Y)`` (returns self), ``encode_x(X)`` and ``encode_y(Y)`` (unit-norm rows:
retrieval scores are cosines) and ``fit_seconds_``; the iterative ones keep ``history_``.
"""

from .batch_average import BatchAveragedUniCon
from .cca import RegularizedCCA
from .sgd_clip import SGDCLIP, sgd_clip_sweep

__all__ = ["RegularizedCCA", "SGDCLIP", "sgd_clip_sweep", "BatchAveragedUniCon"]
