"""Shared pytest configuration for the unicon_dist test suite."""

import os
import sys

import numpy as np
import pytest
import torch

# make ``import unicon_dist`` work with a bare ``pytest`` call as well as ``python -m pytest``
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
