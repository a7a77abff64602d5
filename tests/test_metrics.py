"""retrieval_metrics against a naive loop."""

import numpy as np
import pytest
import torch

import unicon_dist as ud

from _refs import uneven_groups


def naive_recall(z_x, z_y, ks, groups=None):
    n = z_x.shape[0]
    g = np.arange(n) if groups is None else np.asarray(groups)
    out = {}
    for name, Q, Cand in (("x2y", z_x, z_y), ("y2x", z_y, z_x)):
        for k in ks:
            hits = 0
            for i in range(n):
                scores = [float(np.dot(Q[i], Cand[j])) for j in range(n)]
                top = sorted(range(n), key=lambda j: -scores[j])[:k]
                if any(g[j] == g[i] for j in top):
                    hits += 1
            out[f"{name}_R@{k}"] = hits / n
    return out


def _noisy_pair(n, r, noise, seed):
    rng = np.random.default_rng(seed)
    z_x = rng.standard_normal((n, r))
    z_y = z_x + noise * rng.standard_normal((n, r))
    return z_x, z_y


@pytest.mark.parametrize("noise", [0.5, 1.5])
@pytest.mark.parametrize("ks", [(1, 5, 10), (2, 3)])
def test_one_to_one_matches_naive(ks, noise):
    z_x, z_y = _noisy_pair(60, 5, noise, seed=int(10 * noise))
    got = ud.retrieval_metrics(z_x, z_y, ks=ks)
    want = naive_recall(z_x, z_y, ks)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    # not trivially perfect or zero, and not symmetric by accident
    assert 0.0 < want[f"x2y_R@{ks[0]}"] < 1.0


def test_default_keys():
    z_x, z_y = _noisy_pair(30, 4, 0.7, seed=1)
    got = ud.retrieval_metrics(z_x, z_y)
    assert set(got) == {f"{d}_R@{k}" for d in ("x2y", "y2x") for k in (1, 5, 10)}
    assert all(0.0 <= v <= 1.0 for v in got.values())


@pytest.mark.parametrize("shuffle", [False, True])
def test_groups_match_naive(shuffle):
    groups = uneven_groups([1, 2, 3, 4, 1, 5, 2, 3, 1, 4], rng=np.random.default_rng(2), shuffle=shuffle)
    n = len(groups)
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((groups.max() + 1, 6))
    z_x = centres[groups] + 1.2 * rng.standard_normal((n, 6))
    z_y = centres[groups] + 1.2 * rng.standard_normal((n, 6))
    ks = (1, 3, 7)
    got = ud.retrieval_metrics(z_x, z_y, ks=ks, groups=groups)
    want = naive_recall(z_x, z_y, ks, groups)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    # groups change the answer compared to one-to-one
    plain = naive_recall(z_x, z_y, ks)
    assert any(abs(plain[k] - want[k]) > 1e-9 for k in want)


def test_perfect_alignment_gives_one():
    n = 25
    z = np.linalg.qr(np.random.default_rng(0).standard_normal((n, n)))[0]
    got = ud.retrieval_metrics(z, z.copy(), ks=(1, 5))
    assert all(v == 1.0 for v in got.values())
    got_t = ud.retrieval_metrics(torch.from_numpy(z), torch.from_numpy(z), ks=(1,))
    assert got_t["x2y_R@1"] == 1.0 and got_t["y2x_R@1"] == 1.0


def test_perfect_alignment_with_groups_gives_one():
    groups = uneven_groups([3, 1, 4, 2], rng=np.random.default_rng(4), shuffle=True)
    labels = np.unique(groups, return_inverse=True)[1]
    onehot = np.eye(labels.max() + 1)[labels]
    got = ud.retrieval_metrics(onehot, onehot, ks=(1, 2), groups=groups)
    assert all(v == 1.0 for v in got.values())


def test_reversed_pairing_gives_low_recall():
    """Pairing every x with the wrong y: R@1 is 0."""
    n = 20
    z = np.linalg.qr(np.random.default_rng(1).standard_normal((n, n)))[0]
    got = ud.retrieval_metrics(z, z[::-1].copy(), ks=(1,))
    assert got["x2y_R@1"] == 0.0 and got["y2x_R@1"] == 0.0
