"""The SEED loss against a hand-written reference (a plain loop over the formula)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seed import bank as B
from seed.loss import info_nce, seed_loss, seed_loss_sparse, teacher_probs


def reference_loss(z_s: np.ndarray, z_t: np.ndarray, bank: np.ndarray, tau_s: float, tau_t: float,
                   own: np.ndarray | None = None) -> float:
    """mean_i -sum_j p_T(i, j) log p_S(i, j) over D+ = [z_T ; bank], one number at a time."""
    total = 0.0
    for i in range(len(z_s)):
        cols = [z_t[i]] + [bank[j] for j in range(len(bank)) if own is None or not own[i, j]]
        t_logits = [float(np.dot(z_t[i], c)) / tau_t for c in cols]
        s_logits = [float(np.dot(z_s[i], c)) / tau_s for c in cols]
        mt, ms = max(t_logits), max(s_logits)
        zt = sum(math.exp(v - mt) for v in t_logits)
        zs = sum(math.exp(v - ms) for v in s_logits)
        for lt, ls in zip(t_logits, s_logits):
            p_t = math.exp(lt - mt) / zt
            log_p_s = ls - ms - math.log(zs)
            total -= p_t * log_p_s
    return total / len(z_s)


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("batch,K,D", [(1, 1, 4), (5, 16, 8), (12, 50, 16)])
@pytest.mark.parametrize("tau_s,tau_t", [(0.2, 1e-4), (0.2, 0.01), (0.07, 0.07), (1.0, 0.5)])
def test_dense_loss_matches_reference(batch: int, K: int, D: int, tau_s: float, tau_t: float) -> None:
    z_s, z_t, bank = _unit(batch, D, seed=1), _unit(batch, D, seed=2), _unit(K, D, seed=3)
    got = seed_loss(z_s, z_t, bank, tau_s, tau_t).item()
    assert got == pytest.approx(reference_loss(z_s.numpy(), z_t.numpy(), bank.numpy(), tau_s, tau_t), rel=1e-4, abs=1e-5)


def test_own_mask_removes_columns() -> None:
    z_s, z_t, bank = _unit(6, 8, seed=4), _unit(6, 8, seed=5), _unit(10, 8, seed=6)
    own = torch.zeros(6, 10, dtype=torch.bool)
    own[0, 3] = own[2, 0] = own[5, 9] = True
    got = seed_loss(z_s, z_t, bank, 0.2, 0.05, own).item()
    assert got == pytest.approx(reference_loss(z_s.numpy(), z_t.numpy(), bank.numpy(), 0.2, 0.05, own.numpy()), rel=1e-5)
    assert got != pytest.approx(seed_loss(z_s, z_t, bank, 0.2, 0.05).item(), rel=1e-3)


def test_gradient_flows_to_the_student_only_and_matches_finite_differences() -> None:
    z_s = _unit(4, 8, seed=7).requires_grad_(True)
    z_t = _unit(4, 8, seed=8).requires_grad_(True)
    bank = _unit(5, 8, seed=9).requires_grad_(True)
    seed_loss(z_s, z_t, bank, 0.2, 0.05).backward()
    assert z_t.grad is None  # the teacher's embedding is a fixed target (the official code runs it under no_grad)
    assert z_s.grad is not None and z_s.grad.abs().sum() > 0
    # the student's gradient against central differences of the plain-loop reference
    zs, zt, b = z_s.detach().numpy(), z_t.detach().numpy(), bank.detach().numpy()
    eps = 1e-6
    for i, d in [(0, 0), (1, 3), (3, 7)]:
        up, down = zs.copy(), zs.copy()
        up[i, d] += eps
        down[i, d] -= eps
        numeric = (reference_loss(up, zt, b, 0.2, 0.05) - reference_loss(down, zt, b, 0.2, 0.05)) / (2 * eps)
        assert z_s.grad[i, d].item() == pytest.approx(numeric, rel=1e-4, abs=1e-7)


def test_teacher_distribution_is_exact_under_autocast() -> None:
    """A near-duplicate bank entry (cosine 0.9988) must not tie with the positive column at tau_T = 1e-4."""
    z_t = _unit(1, 128, seed=20).float()
    noise = _unit(1, 128, seed=21).float()
    near = torch.nn.functional.normalize(z_t + 0.05 * noise, dim=1)                 # cosine ~0.9988 to z_t
    assert 0.998 < float(near @ z_t.T) < 0.9995
    bank = torch.cat([near, _unit(63, 128, seed=22).float()])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (z_t @ near.T).dtype == torch.bfloat16                              # autocast is really on here
        p_t = teacher_probs(z_t, bank, 1e-4)
        loss = seed_loss(z_t, z_t, bank, 0.2, 1e-4)
    exact = torch.exp(torch.tensor((float(near @ z_t.T) - 1.0) / 1e-4))          # p(near) / p(own) in fp32
    assert p_t[0, 0].item() == pytest.approx(1 / (1 + exact.item()), rel=1e-4) and p_t[0, 0] > 0.99
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(seed_loss(z_t, z_t, bank, 0.2, 1e-4).item(), rel=1e-6)


@pytest.mark.parametrize("tail", ["uniform", "lumped", "renorm"])
@pytest.mark.parametrize("tau_t", [1e-4, 0.05, 0.3])
def test_sparse_loss_equals_dense_when_topk_is_everything(tau_t: float, tail: str) -> None:
    z_s, z_t, bank = _unit(8, 16, seed=10).float(), _unit(8, 16, seed=11).float(), _unit(20, 16, seed=12).float()
    z_s.requires_grad_(True)
    rows, bank_rows = np.arange(8), np.arange(20) + 100
    cols, logp, _ = B.sparse_targets(z_t.numpy(), rows, B.BankIndex(bank.numpy(), "flat"), bank_rows, topk=21,
                                     tau=tau_t, exact_normaliser=True)
    sparse = seed_loss_sparse(z_s, z_t, bank, torch.from_numpy(cols), torch.from_numpy(logp), 0.2, tail=tail)  # type: ignore[arg-type]
    assert sparse.item() == pytest.approx(seed_loss(z_s, z_t, bank, 0.2, tau_t).item(), rel=1e-4)
    sparse.backward()
    assert z_s.grad is not None and torch.isfinite(z_s.grad).all()  # no rest left: no 0 x inf in the gradient


def _tail_reference(log_p_s: np.ndarray, cols: np.ndarray, logp: np.ndarray, allowed: np.ndarray, tail: str) -> float:
    """The three tail rules written out per row, column by column."""
    total = 0.0
    for i in range(len(cols)):
        top = {int(c): float(np.exp(lp)) for c, lp in zip(cols[i], logp[i]) if c >= 0}
        rest = [j for j in range(log_p_s.shape[1]) if allowed[i, j] and j not in top]
        if tail == "renorm":
            z = sum(top.values())
            total -= sum(p / z * log_p_s[i, c] for c, p in top.items())
            continue
        missing = 1.0 - sum(top.values())
        total -= sum(p * log_p_s[i, c] for c, p in top.items())
        if tail == "uniform":
            total -= sum(missing / len(rest) * log_p_s[i, j] for j in rest)
        else:
            total -= missing * math.log(sum(math.exp(log_p_s[i, j]) for j in rest))
    return total / len(cols)


@pytest.mark.parametrize("tail", ["uniform", "lumped", "renorm"])
def test_sparse_tail_rules_match_hand_computation_with_padding_and_own_column(tail: str) -> None:
    """Rows whose top-k hold the own view (column 0) and are padded with -1 (fewer candidates than k), and an
    own-image mask: the padding must not clear column 0 from the top-k set (it once did, through a scatter
    of the clamped -1), and masked columns take no tail mass."""
    z_s, z_t, bank = _unit(3, 8, seed=30).float(), _unit(3, 8, seed=31).float(), _unit(12, 8, seed=32).float()
    cols = torch.tensor([[0, 5, -1, -1], [0, -1, -1, -1], [3, 0, 7, 1]])
    logp = torch.log(torch.tensor([[0.6, 0.2, 1.0, 1.0], [0.7, 1.0, 1.0, 1.0], [0.3, 0.25, 0.1, 0.05]]))
    own = torch.zeros(3, 12, dtype=torch.bool)
    own[0, 2] = own[2, 9] = True                                                    # columns 3 and 10 of D+
    got = seed_loss_sparse(z_s, z_t, bank, cols, logp, 0.2, own, tail=tail).item()  # type: ignore[arg-type]
    assert math.isfinite(got)
    log_p_s = torch.log_softmax(torch.cat([(z_s * z_t).sum(1, keepdim=True),
                                           (z_s @ bank.T).masked_fill(own, float("-inf"))], 1) / 0.2, 1)
    allowed = torch.isfinite(log_p_s).numpy()
    assert got == pytest.approx(_tail_reference(log_p_s.double().numpy(), cols.numpy(), logp.numpy(), allowed, tail),
                                rel=1e-5)


def test_sparse_loss_with_tail_matches_hand_computation() -> None:
    """Top-k probabilities, then the missing mass spread evenly over the other columns of D+ (``uniform``),
    against targets made by the bank's own ``sparse_targets``."""
    z_s, z_t, bank = _unit(6, 8, seed=13).float(), _unit(6, 8, seed=14).float(), _unit(30, 8, seed=15).float()
    rows, bank_rows = np.arange(6), np.arange(30) + 100
    cols, logp, mass = B.sparse_targets(z_t.numpy(), rows, B.BankIndex(bank.numpy(), "flat"), bank_rows, topk=4,
                                        tau=0.5, exact_normaliser=True)
    assert (mass < 0.9).all()  # a real tail
    got = seed_loss_sparse(z_s, z_t, bank, torch.from_numpy(cols), torch.from_numpy(logp), 0.2, tail="uniform").item()
    log_p_s = torch.log_softmax(torch.cat([(z_s * z_t).sum(1, keepdim=True), z_s @ bank.T], 1) / 0.2, 1).double().numpy()
    expected = 0.0
    for i in range(6):
        p = np.full(31, (1 - np.exp(logp[i]).sum()) / (31 - 4))
        p[cols[i]] = np.exp(logp[i])
        expected -= (p * log_p_s[i]).sum() / 6
    assert got == pytest.approx(expected, rel=1e-4)


def test_info_nce_matches_reference() -> None:
    q, k, queue = _unit(5, 8, seed=16), _unit(5, 8, seed=17), _unit(7, 8, seed=18)
    expected = 0.0
    for i in range(5):
        logits = [float(q[i] @ k[i]) / 0.2] + [float(q[i] @ queue[j]) / 0.2 for j in range(7)]
        m = max(logits)
        expected -= logits[0] - m - math.log(sum(math.exp(v - m) for v in logits))
    assert info_nce(q, k, queue, 0.2).item() == pytest.approx(expected / 5, rel=1e-6)
    # under bf16 autocast (the CUDA training step's; the CPU's here) the logits stay float32: the same loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert info_nce(q.float(), k.float(), queue.float(), 0.2).item() == pytest.approx(expected / 5, rel=1e-6)
