"""Metrics against per-user brute force written here."""

from __future__ import annotations

import math

import numpy as np
import pytest

import blockals
from blockals.evaluation import evaluate, ranking_metrics
from test_model import random_ratings, to_frame


def brute_user(scores, relevant, excluded, k):
    """One user's metrics, by the written definitions, with plain Python."""
    candidates = [j for j in range(scores.size) if j not in set(excluded)]
    ranked = sorted(candidates, key=lambda j: (-scores[j], j))
    rel = set(relevant) & set(candidates)
    top = ranked[:k]
    hits = [1 if j in rel else 0 for j in top]
    n_rel = len(set(relevant))
    dcg = sum(h / math.log2(p + 2) for p, h in enumerate(hits))
    idcg = sum(1 / math.log2(p + 2) for p in range(min(k, n_rel)))
    ap = sum(sum(hits[: p + 1]) / (p + 1) for p in range(len(hits)) if hits[p]) / min(k, n_rel)
    pos = [scores[j] for j in candidates if j in rel]
    neg = [scores[j] for j in candidates if j not in rel]
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in pos for b in neg]
    return {
        "precision": sum(hits) / k,
        "recall": sum(hits) / n_rel,
        "ndcg": dcg / idcg,
        "map": ap,
        "auc": sum(pairs) / len(pairs) if pairs else float("nan"),
    }


@pytest.mark.parametrize("k", [1, 3, 5, 20])
def test_ranking_metrics_match_brute_force(k):
    rng = np.random.default_rng(1)
    n, m = 30, 12
    scores = rng.integers(0, 5, (n, m)).astype(float)  # ties everywhere
    relevant = [rng.choice(m, rng.integers(1, 5), replace=False) for _ in range(n)]
    excluded = [rng.choice(m, rng.integers(0, 9), replace=False) for _ in range(n)]
    excluded[0] = np.setdiff1d(np.arange(m), relevant[0])[:-1]  # fewer candidates than k
    got = ranking_metrics(scores, relevant, excluded, k)
    for r in range(n):
        expected = brute_user(scores[r], relevant[r], excluded[r], k)
        for name, value in expected.items():
            if math.isnan(value):
                assert math.isnan(got[name][r])
            else:
                assert got[name][r] == pytest.approx(value), (name, r)


def test_evaluate_matches_brute_force(client2, tmp_path):
    R, M = random_ratings(50, 30, 0.2, seed=4)
    store = blockals.ingest(to_frame(R, M), tmp_path / "r.zarr", n_user_blocks=3, n_item_blocks=2)
    model = blockals.ALS(rank=3, max_iter=3, reg=0.1, biases=True, dtype="float64").fit(store, client2)
    got = evaluate(model, store, None, k=4, relevance=3.0, client=client2)
    pred = (model.global_mean_ + model.user_bias_[:, None] + model.item_bias_[None, :]
            + model.user_factors_ @ model.item_factors_.T)
    err = (pred - R)[M]
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)))
    assert got["mae"] == pytest.approx(np.mean(np.abs(err)))
    scores = model.user_factors_ @ model.item_factors_.T + model.item_bias_[None, :]
    per_user = [brute_user(scores[u], np.flatnonzero(M[u] & (R[u] > 3.0)), [], 4)
                for u in range(50) if (M[u] & (R[u] > 3.0)).any()]
    for name in ("precision", "recall", "ndcg", "map"):
        assert got[f"{name}@4"] == pytest.approx(np.mean([p[name] for p in per_user]))
    assert got["auc"] == pytest.approx(np.nanmean([p["auc"] for p in per_user]))
    assert got["n_ranked_users"] == len(per_user)
