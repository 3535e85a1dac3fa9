"""Bank and cached targets: equal to a hand-written dense reference, own images excluded, fidelity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from seed import bank as B


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_targets(z: np.ndarray, rows: np.ndarray, bank: np.ndarray, bank_rows: np.ndarray, tau: float) -> list[dict[int, float]]:
    """log p_T over D+ = [z ; bank] as a plain loop over the formula: {D+ column: log-probability}."""
    out = []
    for i in range(len(z)):
        logits = {0: float(np.dot(z[i].astype(np.float64), z[i])) / tau}
        for j in range(len(bank)):
            if bank_rows[j] != rows[i]:  # the image's own bank entry is not in its row set
                logits[j + 1] = float(np.dot(z[i].astype(np.float64), bank[j])) / tau
        top = max(logits.values())
        lse = top + math.log(sum(math.exp(v - top) for v in logits.values()))
        out.append({c: v - lse for c, v in logits.items()})
    return out


@pytest.mark.parametrize("tau", [1e-4, 0.05, 0.2])
@pytest.mark.parametrize("kind", ["flat", "torch"])
def test_sparse_targets_equal_dense_reference(tau: float, kind: str) -> None:
    z, bank = _unit(40, 16, 0), _unit(64, 16, 1)
    rows = np.arange(40) * 3                     # some query rows are also bank rows
    bank_rows = np.arange(64) * 2
    index = B.BankIndex(bank, kind)
    cols, logp, mass = B.sparse_targets(z, rows, index, bank_rows, topk=8, tau=tau, exact_normaliser=True)
    ref = reference_targets(z, rows, bank, bank_rows, tau)
    for i in range(40):
        expected = sorted(ref[i].items(), key=lambda kv: -kv[1])[:8]
        assert cols[i].tolist() == [c for c, _ in expected], i
        assert np.allclose(logp[i], [v for _, v in expected], atol=1e-3 if tau < 1e-3 else 1e-4, rtol=1e-5)
        assert mass[i] == pytest.approx(sum(math.exp(v) for _, v in expected), abs=1e-4)
        own_bank_col = np.flatnonzero(bank_rows == rows[i]) + 1
        assert not np.isin(own_bank_col, cols[i]).any()
    assert cols[:, 0].tolist() == [0] * 40     # the teacher's own view is always the top column


def test_dense_log_probs_match_reference() -> None:
    z, bank = _unit(10, 8, 2), _unit(30, 8, 3)
    rows, bank_rows = np.arange(10), np.arange(30)
    dense = B.dense_log_probs(torch.from_numpy(z), torch.from_numpy(rows), torch.from_numpy(bank), torch.from_numpy(bank_rows), 0.1)
    for i, r in enumerate(reference_targets(z, rows, bank, bank_rows, 0.1)):
        for c in range(31):
            expected = r.get(c, -math.inf)
            assert (dense[i, c].item() == expected) if expected == -math.inf else dense[i, c].item() == pytest.approx(expected, abs=1e-4)


def test_sampled_normaliser_is_close_and_unbiased() -> None:
    z, bank = _unit(200, 16, 4), _unit(4000, 16, 5)
    rows, bank_rows = np.arange(200), np.arange(4000) + 10_000
    index = B.BankIndex(bank, "flat")
    _, exact_logp, exact_mass = B.sparse_targets(z, rows, index, bank_rows, topk=16, tau=0.2, exact_normaliser=True)
    ests = [B.sparse_targets(z, rows, index, bank_rows, topk=16, tau=0.2, exact_normaliser=False, tail_samples=512,
                             rng=np.random.default_rng(s))[2] for s in range(8)]
    rel = np.abs(np.mean(ests, axis=0) / exact_mass - 1)
    assert rel.mean() < 0.03, rel.mean()         # mean of 8 estimates is close: no bias
    assert np.abs(ests[0] / exact_mass - 1).max() < 0.25


@pytest.mark.parametrize("kind,floor", [("ivf", 0.9), ("hnsw", 0.9)])
def test_approximate_index_recall_is_bounded(kind: str, floor: float) -> None:
    bank, q = _unit(4096, 32, 6), _unit(256, 32, 7)
    index = B.BankIndex(bank, kind, ivf_lists=64, nprobe=32, ef_search=128)  # isotropic data: IVF's worst case
    _, approx = index.search(q, 10)
    exact = np.argsort(-(q @ bank.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= floor, recall
    full = B.BankIndex(bank, "ivf", ivf_lists=64, nprobe=64)                 # probing every list is exact
    assert np.array_equal(np.sort(full.search(q, 10)[1], axis=1), np.sort(exact, axis=1))
