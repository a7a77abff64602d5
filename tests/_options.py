"""Model options the formula tests pin, independent of the library's defaults."""

import unicon_dist as ud

# The paper's plain fixed point on the features as given: no centring or whitening,
# undamped steps of the plain map (no Anderson mixing), the orthonormal factorization,
# τ = 0.07, full negatives, stopping on the residual only (no plateau stop).  The
# tests that check formulas against dense references are written for this map; the
# library's defaults (whitened views, damped sqrt steps) are tested on their own.
PAPER = dict(center=False, whiten=None, factorization="orthonormal", damping=1.0, loss_tol=0.0, temperature=0.07,
             max_iter=10, solver="plain", negatives="full")


def paper_unicon(**options) -> ud.UniCon:
    """``ud.UniCon`` with :data:`PAPER` under the given options."""
    return ud.UniCon(**{**PAPER, **options})
