"""The float64 verifier: a pass recomputed in float64 against the working precision.

:func:`verify_operator` takes the operator a fit built (tiles in its working dtype) and a
twin over the same rows and encoders whose tiles, statistics and features are float64, and
compares their contributions to C = Φ_Xᵀ S Φ_Y tile by tile: either every tile (the whole
pass, for small n) or a seeded sample of them.  Relative errors are reported for C (the sum
over the tiles compared), for its top-r singular values, for the loss and for the worst
tile, which names the batch and rows where an error sits.
"""

from __future__ import annotations

import time

import numpy as np
import torch

__all__ = ["verify_operator", "check_verify"]


def check_verify(value) -> None:
    """Raise ValueError unless ``value`` is None, "full" or a positive tile count."""
    if value is None or value == "full":
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"verify must be None, 'full' or a positive number of tiles to sample, got {value!r}")


def _relative(diff: torch.Tensor, ref: torch.Tensor) -> float:
    den = float(torch.linalg.norm(ref))
    num = float(torch.linalg.norm(diff))
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def verify_operator(work, reference, tiles="full", *, rank: int, seed: int = 0) -> dict:
    """Compare a working-precision operator with its float64 twin.

    Parameters
    ----------
    work, reference : CrossProductOperator
        Over the same rows, panels, batches and encoders; ``reference`` in float64.
    tiles : "full" or int
        Every tile of the pass, or a seeded sample of this many (all when there are fewer).
    rank : int
        How many leading singular values to compare.
    seed : int
        Seed of the sample.

    Returns
    -------
    dict
        ``mode``, ``tiles`` (compared) and ``tiles_total``; ``c_rel_error`` ‖ΣΔ‖_F/‖ΣC₆₄‖_F
        over the tiles compared (all of C in "full" mode); ``sv_rel_error``
        max_i |σ_i − σ₆₄,i|/σ₆₄,i over the top ``rank`` singular values of those sums
        (C's own in "full" mode); ``loss_rel_error``; ``tile_max_rel_error`` and
        ``worst_tile`` (batch, positions and first/last source row); ``seconds``.
    """
    check_verify(tiles)
    t0 = time.perf_counter()
    keys = work.tile_keys()
    if keys != reference.tile_keys():
        raise ValueError("the verifier's float64 twin cuts the pass into other tiles than the working operator")
    if not keys:
        raise ValueError("nothing to verify: the operator has no tiles (s = 0 is formed in closed form)")
    chosen = keys
    if tiles != "full" and int(tiles) < len(keys):
        pick = np.sort(np.random.default_rng(seed).choice(len(keys), int(tiles), replace=False))
        chosen = [keys[i] for i in pick]
    total = total64 = None
    worst = (-1.0, None)
    for key in chosen:
        part, part64 = work.tile_product(key), reference.tile_product(key)
        total = part if total is None else total.add_(part)
        total64 = part64 if total64 is None else total64.add_(part64)
        err = _relative(part - part64, part64)
        if err > worst[0]:
            worst = (err, key)
    k = min(int(rank), *total64.shape)
    sv, sv64 = torch.linalg.svdvals(total)[:k], torch.linalg.svdvals(total64)[:k]
    nz = sv64 > 0
    sv_err = float(((sv - sv64).abs()[nz] / sv64[nz]).max()) if bool(nz.any()) else 0.0
    bk, kp, kq, i0, i1, j0, j1 = worst[1]
    rows, cols = work.batch_rows(bk, i0, i1), work.batch_rows(bk, j0, j1)
    loss64 = float(reference.loss)
    return {
        "mode": "full" if len(chosen) == len(keys) else "sample",
        "tiles": len(chosen),
        "tiles_total": len(keys),
        "c_rel_error": _relative(total - total64, total64),
        "sv_rel_error": sv_err,
        "loss_rel_error": abs(float(work.loss) - loss64) / abs(loss64) if loss64 else abs(float(work.loss)),
        "tile_max_rel_error": worst[0],
        "worst_tile": {"batch": int(bk), "positions": [int(i0), int(i1), int(j0), int(j1)],
                       "x_rows": [int(rows.min()), int(rows.max())], "y_rows": [int(cols.min()), int(cols.max())]},
        "dtype": str(work.dtype).replace("torch.", ""),
        "seconds": time.perf_counter() - t0,
    }
