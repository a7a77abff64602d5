"""What a solve reports about its own numerics (``UniCon.diagnostics_``).

Gathered from the fitted maps and the per-iteration records of ``history_``; nothing here
touches the data again.  Each safeguard of the solver that fired is listed by name with
what it did, and warned once (a RuntimeWarning) when the solve ends:

- ``nystrom eigenvalue floor``: eigenvalues of K_LL below ``eig_floor``·λ_max were dropped
  (duplicated or near-collinear landmarks); the map has fewer features than landmarks.
  Already warned when the map is built, so only listed here.
- ``whitening eigenvalue clip``: round-off left negative eigenvalues in a view's
  covariance; they were set to 0 before the ridge.
- ``log-space statistics``: e^{s/τ} could overflow the tile dtype, so pass 1 kept its
  sums in log space (slower, exact).
- ``small spectral gap``: σ_r/σ_{r+1} < 1 + 1e-3 at the last step: the rank-r subspace,
  and so the embedding, is ill-determined (perturbations of C move it by ~1/(σ_r − σ_{r+1})).
- ``lowest-residual iterate kept``: the iteration neither converged nor reached a loss
  plateau; the iterate closest to a fixed point (lowest residual) was kept, which need not
  be the last.
"""

from __future__ import annotations

import math
import warnings

__all__ = ["kept_as", "solve_diagnostics", "flatten_diagnostics", "format_diagnostics", "SMALL_GAP"]

SMALL_GAP = 1.0 + 1e-3

_STEP_KEYS = ("spectral_gap", "spectral_gap_of", "svd_residual", "input_residual")


def _views(model, pick) -> dict:
    out = {}
    for side in ("x", "y"):
        fmap = getattr(model, f"map_{side}_", None)
        out[side] = pick(fmap) if fmap is not None else None
    return out


def _nystrom(fmap):
    base = getattr(fmap, "base", fmap) if hasattr(fmap, "apply") else fmap
    return None if base is None else getattr(base, "spectrum", None)


def _whitening(fmap):
    return dict(fmap.spectrum) if hasattr(fmap, "apply") and fmap.spectrum else None


def _finite(values):
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def kept_as(model) -> str:
    """Which iterate a fitted model kept, in words: "fixed point" when it converged, else
    "lowest residual" (or "lowest loss"/"lowest objective" when ``loss_tol`` > 0, the
    rule of :func:`unicon_dist.solver.fixed_point.solve`)."""
    if getattr(model, "converged_", False):
        return "fixed point"
    if float(getattr(model, "loss_tol", 0.0) or 0.0) > 0:
        return "lowest loss" if model.similarity == "cosine" else "lowest objective"
    return "lowest residual"


def solve_diagnostics(model, verification: dict | None = None, warn: bool = True) -> dict:
    """The ``diagnostics_`` of a fitted model (JSON-able), warning for each safeguard that fired.

    Returns
    -------
    dict
        ``nystrom`` and ``whitening`` (per view "x"/"y": the spectrum summaries, None
        without that stage); ``last_step`` (the final iteration's spectral gap and what
        it is of, SVD residual, fixed-point residual of its input, loss); ``lse_range``
        [min, max] of the log-sum-exp statistics over all iterations (None for a
        general ψ); ``log_space_batches`` (the most in one pass); ``residuals`` the
        fixed-point residual per iteration; ``safeguards`` a list of {"name", "detail"};
        ``verify`` the float64 comparison or None.
    """
    history = list(getattr(model, "history_", []) or [])
    last = history[-1] if history else {}
    nystrom = _views(model, _nystrom)
    whitening = _views(model, _whitening)
    lse_lo = _finite(h.get("lse_min") for h in history)
    lse_hi = _finite(h.get("lse_max") for h in history)
    log_space = _finite(h.get("log_space_batches") for h in history)
    out = {
        "nystrom": nystrom,
        "whitening": whitening,
        "last_step": {"iteration": last.get("iteration"), "loss": last.get("loss"),
                      **{k: last.get(k) for k in _STEP_KEYS}},
        "lse_range": [min(lse_lo), max(lse_hi)] if lse_lo and lse_hi else None,
        "log_space_batches": max(log_space) if log_space else 0,
        "residuals": [h.get("input_residual") for h in history],
        "verify": verification,
    }
    fired = []
    for side, spec in nystrom.items():
        if spec and spec.get("n_floored"):
            fired.append({"name": "nystrom eigenvalue floor",
                          "detail": f"view {side.upper()}: {spec['n_floored']} of {spec['n_landmarks']} eigenvalues of "
                                    f"K_LL below {spec['eig_floor']:g} x the largest dropped (condition number "
                                    f"{spec['condition_number']:.3g}); effective rank {spec['effective_rank']}",
                          "warned": True})
    for side, spec in whitening.items():
        if spec and spec.get("n_clipped"):
            fired.append({"name": "whitening eigenvalue clip",
                          "detail": f"view {side.upper()}: {spec['n_clipped']} negative eigenvalues of the feature "
                                    "covariance (round-off) set to 0 before the ridge"})
    if log_space:
        worst = max(log_space)
        if worst:
            fired.append({"name": "log-space statistics",
                          "detail": f"up to {worst} batch(es) per pass kept pass 1's sums in log space: |s|/τ could "
                                    "overflow the tile dtype (small τ or unnormalised embeddings); exact, but slower"})
    gap = last.get("spectral_gap")
    if gap is not None and gap < SMALL_GAP:
        fired.append({"name": "small spectral gap",
                      "detail": f"sigma_r/sigma_(r+1) = {gap:.6g} of {last.get('spectral_gap_of')} at the last step "
                                f"(rank {model.rank}): the rank-r subspace is ill-determined; consider another rank"})
    reason = getattr(model, "stop_reason_", None)
    if reason == "max_iter" and not getattr(model, "converged_", False):
        fired.append({"name": f"{kept_as(model)} iterate kept",
                      "detail": f"no fixed point or loss plateau in {len(history)} iterations; iteration "
                                f"{getattr(model, 'best_iteration_', '?')} (the {kept_as(model)}) was kept",
                      "warned": True})
    out["safeguards"] = fired
    if warn:
        for item in fired:
            if not item.get("warned"):
                warnings.warn(f"UniCon safeguard '{item['name']}': {item['detail']}", RuntimeWarning, stacklevel=3)
    return out


def flatten_diagnostics(diag: dict, prefix: str = "diagnostics") -> dict:
    """One level of dotted keys (``diagnostics.last_step.spectral_gap``); lists stay lists."""
    flat = {}
    for key, value in (diag or {}).items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            flat.update(flatten_diagnostics(value, name))
        else:
            flat[name] = value
    return flat


def _g(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def format_diagnostics(diag: dict | None) -> list[str]:
    """Human-readable lines of a ``diagnostics_`` dict (for job logs and the CLI)."""
    if not diag:
        return []
    lines = []
    for side in ("x", "y"):
        ny = (diag.get("nystrom") or {}).get(side)
        if ny:
            lines.append(f"Nystrom {side.upper()}: K_LL condition {_g(ny['condition_number'])}, effective rank "
                         f"{ny['effective_rank']} of {ny['n_landmarks']} ({ny['n_floored']} eigenvalues floored)")
        wh = (diag.get("whitening") or {}).get(side)
        if wh:
            lines.append(f"whitening {side.upper()}: covariance eigenvalues {_g(wh.get('smallest'))} to "
                         f"{_g(wh.get('largest'))}, condition after the ridge {_g(wh.get('condition_regularised'))}")
    last = diag.get("last_step") or {}
    lse = diag.get("lse_range")
    lines.append(f"last step: spectral gap {_g(last.get('spectral_gap'))} (of {last.get('spectral_gap_of')}), "
                 f"SVD residual {_g(last.get('svd_residual'))}, fixed-point residual "
                 f"{_g(last.get('input_residual'))}, log-sum-exp range "
                 f"{'-' if lse is None else f'[{lse[0]:.3g}, {lse[1]:.3g}]'}")
    ver = diag.get("verify")
    if ver:
        lines.append(f"float64 verifier ({ver['mode']}, {ver['tiles']} of {ver['tiles_total']} tiles): C rel. error "
                     f"{_g(ver['c_rel_error'])}, top-r singular values {_g(ver['sv_rel_error'])}, worst tile "
                     f"{_g(ver['tile_max_rel_error'])} (batch {ver['worst_tile']['batch']}, x rows "
                     f"{ver['worst_tile']['x_rows'][0]}-{ver['worst_tile']['x_rows'][1]})")
    for item in diag.get("safeguards") or []:
        lines.append(f"safeguard fired: {item['name']}: {item['detail']}")
    return lines
