"""Memory budgets for tests that need a fit cut into several panels."""

from __future__ import annotations

import unicon_dist as ud


def panel_budget(data, rows: int = 260, **options) -> int:
    """The smallest budget (to 1 %) under which a fit of ``data`` with ``options`` plans
    panels of at least ``rows`` rows (``data``: a store or its path, or ``(X, Y)``), as
    :meth:`unicon_dist.UniCon.memory_plan` plans it."""
    data = data if isinstance(data, tuple) else (data,)
    options = {k: v for k, v in options.items() if k != "memory_budget"}
    budget = 1 << 16
    while True:
        try:
            if ud.UniCon(**options, memory_budget=budget).memory_plan(*data).panel_rows >= rows:
                return budget
        except ValueError:
            pass
        budget = int(budget * 1.01) + 1
