"""Batches, panels and owners (unicon_dist.solver.layout): groups stay whole, rows are covered once."""

import numpy as np
import pytest

from unicon_dist.solver.layout import Layout, assign_panels, cut_panels, make_batches, shared_batches


@pytest.mark.parametrize("seed", range(6))
def test_panels_never_split_a_group(seed):
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, int(rng.integers(5, 60)), int(rng.integers(20, 300))))
    panel_rows = int(rng.integers(1, 40))
    panels = cut_panels(labels, labels.size, panel_rows)
    assert panels[0][0] == 0 and panels[-1][1] == labels.size
    assert all(a[1] == b[0] for a, b in zip(panels[:-1], panels[1:]))  # consecutive, no gap or overlap
    for p0, p1 in panels:
        assert p1 > p0
        assert p0 == 0 or labels[p0] != labels[p0 - 1]  # a cut falls between groups
        # over-long only when the panel is one group larger than panel_rows
        assert p1 - p0 <= panel_rows or labels[p0] == labels[p1 - 1]


def test_one_to_one_panels_are_even_cuts():
    assert cut_panels(None, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert cut_panels(None, 3, 4) == [(0, 3)]


@pytest.mark.parametrize("negatives, split", [("full", "random"), (7, "random"), (7, "contiguous")])
def test_layout_covers_every_row_once_in_group_order(negatives, split):
    n = 50
    groups = np.random.default_rng(1).integers(0, 12, n)
    layout = Layout.build(n, groups=groups, negatives=negatives, seed=3, batch_split=split, panel_rows=9)
    rows = np.concatenate([b.row_numbers(0, b.n) for b in layout.batches])
    assert sorted(rows.tolist()) == list(range(n))
    for b in layout.batches:
        g = groups[b.row_numbers(0, b.n)]
        assert (np.diff(g) >= 0).all() or b.pos.one_to_one  # positions are in group order
        for p0, p1 in b.panels:
            assert p0 == 0 or g[p0] != g[p0 - 1]
    assert layout.panel_sizes() == [p1 - p0 for b in layout.batches for p0, p1 in b.panels]
    assert len(layout.panel_keys) == len(layout.panel_sizes())
    expected = make_batches(n, negatives, 3, split)
    assert len(layout.batches) == (1 if expected is None else len(expected))


def test_load_groups_fill_a_panel_and_follow_the_visiting_order():
    layout = Layout.build(40, negatives=6, batch_split="contiguous", panel_rows=14)
    keys = layout.panel_keys
    for key in keys:
        group = layout.load_group(key)
        assert group[0][:2] == key
        assert sum(p1 - p0 for _, _, p0, p1 in group) <= 14
        at = keys.index(key)
        assert [g[:2] for g in group] == keys[at:at + len(group)]


def test_batch_rows_read_as_slices_when_they_are_runs():
    layout = Layout.build(30, negatives=10, batch_split="contiguous")
    b = layout.batches[1]
    assert b.source_rows(0, 10) == slice(10, 20)
    shuffled = Layout.build(30, negatives=10, seed=0).batches[0]
    assert isinstance(shuffled.source_rows(0, 10), np.ndarray)


def test_assign_panels_is_contiguous_and_balanced():
    assert assign_panels([10] * 6, 2) == [[0, 1, 2], [3, 4, 5]]
    assert assign_panels([50, 10, 10, 10, 10, 10], 2) == [[0], [1, 2, 3, 4, 5]]
    assert assign_panels([5], 3) == [[0], [], []]


def test_ownership():
    layout = Layout.build(40, panel_rows=10)
    b = layout.batches[0]
    assert layout.owned(b, None) == [0, 1, 2, 3] and layout.whole(b, None)
    assert layout.owned(b, {(0, 1), (0, 3)}) == [1, 3] and not layout.whole(b, {(0, 1)})
    assert shared_batches([[(0, 0), (0, 1)], [(0, 2), (1, 0)], [(1, 1)]]) == [0, 1]
    assert shared_batches([[(0, 0)], [(1, 0)]]) == []


def test_panel_rows_must_be_positive():
    with pytest.raises(ValueError, match="panel_rows must be a positive integer"):
        Layout.build(10, panel_rows=0)


def test_auto_negatives_are_full_up_to_the_threshold_and_batches_above():
    from unicon_dist.solver.layout import AUTO_BATCH, AUTO_FULL_ROWS, resolve_negatives

    assert resolve_negatives(AUTO_FULL_ROWS, "auto") == "full" and make_batches(AUTO_FULL_ROWS, "auto") is None
    assert resolve_negatives(AUTO_FULL_ROWS + 1, "auto") == AUTO_BATCH
    batches = make_batches(AUTO_FULL_ROWS + 1, "auto", seed=3)
    assert [len(b) for b in batches[:-1]] == [AUTO_BATCH] * (len(batches) - 1)
    assert all(np.array_equal(a, b) for a, b in zip(batches, make_batches(AUTO_FULL_ROWS + 1, AUTO_BATCH, seed=3)))
    assert resolve_negatives(10, 512) == 512 and resolve_negatives(10, "full") == "full"


@pytest.mark.parametrize("n, same_as", [(2000, "full"), (4200, 1024)])
def test_a_fit_with_auto_negatives_is_the_fit_with_what_auto_picks(n, same_as):
    """One statistics and product pass each (max_iter=1): the losses are those of the
    explicit choice, bit for bit, and differ from the other choice's."""
    import unicon_dist as ud

    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, 4)).astype(np.float32)
    Y = (X @ rng.standard_normal((4, 3)) + rng.standard_normal((n, 3))).astype(np.float32)

    def losses(negatives):
        model = ud.UniCon(rank=2, negatives=negatives, max_iter=1).fit(X, Y)
        return [model.initial_loss_] + [h["loss"] for h in model.history_]

    other = 512 if same_as == "full" else "full"  # (a batch of 4096 ≥ n would be all rows)
    assert losses("auto") == losses(same_as) != losses(other)
