"""The SEED loss (Fang et al., ICLR 2021), as in the official code (jacobswan1/SEED, ``seed/builder.py``).

"We minimise the cross-entropy between the teacher's and the student's similarity distributions
over the instance queue": with z_T = normalize(teacher(x)) and z_S = normalize(head(student(x)))
for the same view x, and D+ = [z_T ; bank],

    p_T = softmax(z_T . D+ / tau_T),   log p_S = log_softmax(z_S . D+ / tau_S),
    loss = mean over the batch of -sum_j p_T(j) log p_S(j).

Defaults: tau_S = 0.2, tau_T = 1e-4 (the teacher target is then nearly one-hot on column 0).
Offline, the bank holds cached views of other images; ``own`` masks a view's own image in the
bank (``[B, K]``, True = excluded from both distributions).

``seed_loss`` computes the teacher side densely from cached (or online) embeddings;
``seed_loss_sparse`` takes the cached top-k targets (columns of D+, log-probabilities); the mass
the top-k miss is spread evenly over the remaining columns, lumped into one target, or dropped
with the top-k renormalised (``Tail``). Each equals the dense loss when the top-k capture all the
mass.
"""

from __future__ import annotations

from typing import Literal

import torch

from seed.devices import ieee_float32


def own_mask(rows: torch.Tensor, bank_rows: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` True where bank entry j is a view of row i's own image (excluded from D+ for that row)."""
    return rows[:, None] == bank_rows[None, :]                                 # B x K


def dplus_logits(z: torch.Tensor, z_t: torch.Tensor, bank: torch.Tensor, own: torch.Tensor | None = None) -> torch.Tensor:
    """Similarities of ``z`` to D+ = [z_T ; bank]: ``[B, 1 + K]``, own-image bank columns at -inf.

    Always IEEE float32, whatever the autocast state or TF32 setting: at tau_T = 1e-4 a bf16 product rounds a
    near-duplicate neighbour (cosine 0.9988) up to the positive's 1.0 and splits p_T between them.
    """
    with torch.autocast(z.device.type, enabled=False), ieee_float32():
        z, z_t, bank = z.float(), z_t.float(), bank.float()
        l_pos = (z * z_t).sum(dim=1, keepdim=True)                            # B x 1: against the teacher's own view
        l_neg = z @ bank.T                                                    # B x K: against the bank
        if own is not None:
            l_neg = l_neg.masked_fill(own, float("-inf"))
        return torch.cat([l_pos, l_neg], dim=1)                               # B x (1 + K)


def student_log_probs(z_s: torch.Tensor, z_t: torch.Tensor, bank: torch.Tensor, tau_s: float,
                      own: torch.Tensor | None = None) -> torch.Tensor:
    """log p_S over D+ = [z_T ; bank]: ``[B, 1 + K]``."""
    return torch.log_softmax(dplus_logits(z_s, z_t, bank, own) / tau_s, dim=1)


def teacher_probs(z_t: torch.Tensor, bank: torch.Tensor, tau_t: float, own: torch.Tensor | None = None) -> torch.Tensor:
    """p_T over D+ = [z_T ; bank]: ``[B, 1 + K]``."""
    return torch.softmax(dplus_logits(z_t, z_t, bank, own) / tau_t, dim=1)


def seed_loss(z_s: torch.Tensor, z_t: torch.Tensor, bank: torch.Tensor, tau_s: float = 0.2, tau_t: float = 1e-4,
              own: torch.Tensor | None = None) -> torch.Tensor:
    """Soft cross-entropy of the student's over the teacher's distribution on D+ (a scalar).

    Args:
        z_s: L2-normalised student embeddings, ``[B, D]``.
        z_t: L2-normalised teacher embeddings of the same views, ``[B, D]`` (no gradient).
        bank: L2-normalised instance bank, ``[K, D]``.
        own: optional ``[B, K]`` mask of each view's own image in the bank.
    """
    z_t = z_t.detach()                                                        # the teacher side takes no gradient
    p_t = teacher_probs(z_t, bank, tau_t, own)                                # B x (1 + K)
    log_p_s = student_log_probs(z_s, z_t, bank, tau_s, own)                   # B x (1 + K)
    return -torch.where(p_t > 0, p_t * log_p_s, 0.0).sum(dim=1).mean()      # 0 log 0 = 0 on masked columns


Tail = Literal["uniform", "lumped", "renorm"]
"""What the sparse loss does with the teacher mass its top-k miss (``train.tail``):

- ``uniform``: spread it evenly over the other allowed columns of D+ (each gets ``tail / n_rest``);
- ``lumped``: one target for all of them together, against the student's total mass there,
  ``-tail * log sum_rest p_S``: the exact cross-entropy of the two distributions coarsened to
  (top-k columns, rest);
- ``renorm``: drop it and renormalise the top-k to sum to 1.

All three equal the dense loss when the top-k hold all the mass (at tau_T = 1e-4 they do). ``renorm``
is the default: its gradient is the closest to the dense loss's at every tau_T measured
(``bench/sparse_tail.py``)."""


def seed_loss_sparse(z_s: torch.Tensor, z_t: torch.Tensor, bank: torch.Tensor, cols: torch.Tensor,
                     logp_t: torch.Tensor, tau_s: float = 0.2, own: torch.Tensor | None = None,
                     tail: Tail = "renorm") -> torch.Tensor:
    """SEED loss against cached sparse targets (a scalar).

    Args:
        cols: ``[B, k]`` columns of D+ holding the teacher's top-k (0 = own view, -1 = none).
        logp_t: ``[B, k]`` their log-probabilities under the full teacher distribution.
        tail: what to do with the mass the top-k miss (``Tail``).
    """
    log_p_s = student_log_probs(z_s, z_t.detach(), bank, tau_s, own)          # B x (1 + K)
    keep = cols >= 0                                                          # B x k
    idx = cols.clamp(min=0).long()
    p_top = torch.where(keep, logp_t.float().exp(), 0.0)                      # B x k
    if tail == "renorm":
        p_top = p_top / p_top.sum(dim=1, keepdim=True).clamp(min=1e-30)
    top_term = (p_top * log_p_s.gather(1, idx)).sum(dim=1)                    # B
    if tail == "renorm":
        return -top_term.mean()
    allowed = torch.isfinite(log_p_s)                                         # B x (1 + K)
    # counted, not scattered: a -1 (clamped to column 0) must not clear column 0 when it is in the top-k
    in_top = torch.zeros(allowed.shape, dtype=torch.int32, device=cols.device).scatter_add_(1, idx, keep.int()) > 0
    rest = allowed & ~in_top
    mass = (1.0 - p_top.sum(dim=1)).clamp(min=0.0)
    mass = torch.where(rest.any(dim=1), mass, 0.0)
    if tail == "lumped":
        has_rest = rest.any(dim=1, keepdim=True)                              # rows without a rest get 0, not -inf
        rest_log_p = torch.logsumexp(torch.where(rest, log_p_s, torch.where(has_rest, float("-inf"), 0.0)), dim=1)
        return -(top_term + mass * torch.where(rest.any(dim=1), rest_log_p, 0.0)).mean()
    n_rest = rest.sum(dim=1).clamp(min=1)
    rest_mean = torch.where(rest, log_p_s, 0.0).sum(dim=1) / n_rest          # B: mean log p_S over the rest
    return -(top_term + mass * rest_mean).mean()


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    """MoCo's InfoNCE (He et al. 2020, ``moco/builder.py``): positives at column 0 (a scalar).

    Logits in float32 whatever the autocast state, as ``dplus_logits``: under bf16 autocast the negatives'
    product alone would be rounded (about 0.02 of noise in a logit at tau = 0.2), the positives not.
    """
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = q.float(), k.float(), queue.float()
        l_pos = (q * k).sum(dim=1, keepdim=True)                              # N x 1
        l_neg = q @ queue.T                                                   # N x K
        logits = torch.cat([l_pos, l_neg], dim=1) / tau                       # N x (1 + K)
    return torch.nn.functional.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
