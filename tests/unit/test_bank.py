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


def reference_log_normaliser(z: np.ndarray, rows: np.ndarray, bank: np.ndarray, bank_rows: np.ndarray,
                             tau: float) -> np.ndarray:
    """log Z over D+ = [z ; bank minus the own image's entries], in float64 numpy."""
    z64, bank64 = z.astype(np.float64), bank.astype(np.float64)
    logits = np.concatenate([(z64 * z64).sum(axis=1, keepdims=True), z64 @ bank64.T], axis=1) / tau
    logits[:, 1:][rows[:, None] == bank_rows[None, :]] = -np.inf
    top = logits.max(axis=1)
    return top + np.log(np.exp(logits - top[:, None]).sum(axis=1))


def _targets_case(K: int = 600, n: int = 90, d: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    z, bank = _unit(n, d, 8), _unit(K, d, 9)
    bank_rows = np.sort(np.random.default_rng(10).choice(5 * K, size=K, replace=False))
    rows = np.random.default_rng(11).choice(5 * K, size=n)
    rows[: n // 3] = bank_rows[: n // 3]          # a third of the views have their own image in the bank
    return z, rows, bank, bank_rows


@pytest.mark.parametrize("tau", [1e-4, 0.05])
def test_torch_index_targets_equal_flat_and_numpy_normaliser(tau: float) -> None:
    z, rows, bank, bank_rows = _targets_case()
    out = {kind: B.sparse_targets(z, rows, B.BankIndex(bank, kind), bank_rows, topk=12, tau=tau, exact_normaliser=True)
           for kind in ("torch", "flat")}
    (tc, tl, tm), (fc, fl, fm) = out["torch"], out["flat"]
    assert np.array_equal(tc, fc)
    assert np.allclose(tl, fl, atol=1e-3 if tau < 1e-3 else 1e-5, rtol=1e-6)
    assert np.allclose(tm, fm, atol=1e-5)
    # column 0 (the own view, logit |z|^2 / tau) comes first: its log-probability gives log Z back
    assert (tc[:, 0] == 0).all()
    log_z = (z.astype(np.float64) ** 2).sum(axis=1) / tau - tl[:, 0]
    ref = reference_log_normaliser(z, rows, bank, bank_rows, tau)
    assert np.allclose(log_z, ref, atol=2e-3 if tau < 1e-3 else 1e-5, rtol=1e-6)


@pytest.mark.parametrize("kind", ["torch", "flat"])
@pytest.mark.parametrize("exact", [True, False])
def test_chunked_targets_equal_unchunked(kind: str, exact: bool) -> None:
    z, rows, bank, bank_rows = _targets_case()
    index = B.BankIndex(bank, kind)

    def run(budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return B.sparse_targets(z, rows, index, bank_rows, topk=12, tau=0.05, exact_normaliser=exact,
                                tail_samples=200, rng=np.random.default_rng(3), max_logits_bytes=budget)

    whole = run(1 << 30)
    width = 601 if exact or kind == "torch" else 4 * 200
    for budget in (1, 7 * 4 * width, 32 * 4 * width + 5):   # 1-row, 7-row (uneven last) and 32-row chunks
        assert B.chunk_rows(width, budget) in (1, 7, 32)
        part = run(budget)
        assert np.array_equal(part[0], whole[0])
        assert np.allclose(part[1], whole[1], atol=1e-5, rtol=1e-6) and np.array_equal(np.isfinite(part[1]), np.isfinite(whole[1]))
        assert np.allclose(part[2], whole[2], atol=1e-6)


def test_chunk_rows_bounds_the_logits() -> None:
    assert B.chunk_rows(65_537) == 1023 and 1023 * 65_537 * 4 <= B.LOGITS_BUDGET   # the default: 256 MiB
    assert B.chunk_rows(65_536) == 1024
    assert B.chunk_rows(10, 39) == 1 and B.chunk_rows(10, 80) == 2


def test_torch_search_chunked_equals_numpy() -> None:
    bank, q = _unit(500, 16, 12), _unit(70, 16, 13)
    index = B.BankIndex(bank, "torch")
    exact = np.argsort(-(q.astype(np.float64) @ bank.T.astype(np.float64)), axis=1)[:, :9]
    for budget in (1, 3 * 500 * 4, B.LOGITS_BUDGET):
        sims, pos = index.search(q, 9, max_logits_bytes=budget)
        assert np.array_equal(pos, exact)
        assert np.allclose(sims, np.take_along_axis(q @ bank.T, exact, axis=1), atol=1e-6)


def test_targets_ignore_autocast() -> None:
    """bf16 autocast around the call changes nothing: the targets compute in float32."""
    z, rows, bank, bank_rows = _targets_case()
    index = B.BankIndex(bank, "torch")
    plain = B.sparse_targets(z, rows, index, bank_rows, topk=12, tau=1e-4, exact_normaliser=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = B.sparse_targets(z, rows, index, bank_rows, topk=12, tau=1e-4, exact_normaliser=True)
    for a, b in zip(plain, under):
        assert np.array_equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("exact", [True, False])
def test_cuda_targets_equal_cpu(exact: bool) -> None:
    z, rows, bank, bank_rows = _targets_case(K=3000, n=500, d=128)
    out = []
    for device in ("cpu", "cuda"):
        index = B.BankIndex(bank, "torch", device=torch.device(device))
        out.append(B.sparse_targets(z, rows, index, bank_rows, topk=16, tau=1e-4, exact_normaliser=exact,
                                    tail_samples=256, rng=np.random.default_rng(4), max_logits_bytes=200 * 3001 * 4))
    (cc, cl, cm), (gc, gl, gm) = out
    assert np.array_equal(cc, gc)
    assert np.allclose(cl, gl, atol=2e-3, rtol=1e-6) and np.allclose(cm, gm, atol=1e-4)


def test_a_flat_bank_on_a_gpu_without_faiss_gpu_searches_by_the_devices_product() -> None:
    """``flat`` is an exact search: on CUDA without faiss-gpu its top-k comes from the normaliser's product on the
    GPU (no CPU search); with faiss-gpu, on the CPU, and for the other kinds, as before."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert B.searches_on_device("flat", cuda, faiss_gpu=False) and not B.searches_on_device("flat", cuda, faiss_gpu=True)
    assert not B.searches_on_device("flat", cpu, faiss_gpu=False)
    assert B.searches_on_device("torch", cpu, faiss_gpu=False) and B.searches_on_device("torch", cuda, faiss_gpu=True)
    assert not any(B.searches_on_device(kind, cuda, faiss_gpu=False) for kind in ("ivf", "hnsw"))
    assert not B.BankIndex(np.eye(4, dtype=np.float32), "flat").on_device    # FAISS on the CPU here


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_flat_bank_on_cuda_gives_the_targets_of_the_torch_bank() -> None:
    z, rows, bank, bank_rows = _targets_case(K=3000, n=500, d=128)
    flat, plain = (B.BankIndex(bank, kind, device=torch.device("cuda")) for kind in ("flat", "torch"))
    if flat.on_gpu:
        pytest.skip("faiss-gpu is installed: flat searches with it, not by the device's product")
    assert flat.on_device
    out = [B.sparse_targets(z, rows, index, bank_rows, topk=16, tau=1e-4, exact_normaliser=True) for index in (flat, plain)]
    (fc, fl, fm), (tc, tl, tm) = out
    assert np.array_equal(fc, tc) and np.allclose(fl, tl, atol=2e-3, rtol=1e-6) and np.allclose(fm, tm, atol=1e-4)


def test_the_seed_logits_run_in_ieee_float32_whatever_the_process_asked_for_and_its_setting_is_restored() -> None:
    """A process that asked for TF32 matmuls (``set_float32_matmul_precision("high")``) gets IEEE float32 inside
    ``ieee_float32`` (the bank's and the loss's logits are made there) and its own setting back on exit, also when
    the body raises. On this CPU TF32 would not change a product; the CUDA test below measures it."""
    from seed.devices import ieee_float32

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        with ieee_float32():
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
        with pytest.raises(RuntimeError, match="inside"), ieee_float32():
            raise RuntimeError("inside")
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bank_logits_stay_ieee_float32_when_the_process_asks_for_tf32() -> None:
    """At tau_T = 1e-4 a TF32 product (about 1e-3 off in a cosine) moves a logit by about 10: with TF32 asked
    for, ``bank_logits`` on the GPU stays within float32 rounding of a float64 reference."""
    from seed.devices import ieee_float32

    q, bank = torch.from_numpy(_unit(256, 128, 1)), torch.from_numpy(_unit(4096, 128, 2))
    ref = q.double() @ bank.double().T
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        got = B.bank_logits(q.cuda(), bank.cuda()).cpu().double()
        loose = (q.cuda() @ bank.cuda().T).cpu().double()                   # the same product, TF32 as asked
        with ieee_float32():
            assert matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision = before
    assert (got - ref).abs().max() < 1e-5
    assert (loose - ref).abs().max() > 1e-4  # the check above can fail: TF32 is in effect outside the guard


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_the_own_view_counts_in_the_normaliser_when_a_near_duplicate_pushes_it_out_of_the_top_k(kind: str) -> None:
    """A bank entry more similar to a view than the view itself (the view stored in float16 has a norm under
    1; the entry is its direction): with ``topk=1`` the entry takes the only column. The own view is still
    in D+, so both normalisers give the entry its dense log-probability (the sampled one with a tail sample of
    the whole bank, which makes its estimate exact), not 0."""
    bank = _unit(50, 16, 14)
    z = (bank[:3] * 0.999).astype(np.float32)                 # |z|^2 = 0.998 < z . bank[i] = 0.999
    rows, bank_rows = np.array([100, 101, 102]), np.arange(50)
    ref = reference_targets(z, rows, bank, bank_rows, 0.05)
    for exact in (True, False):
        cols, logp, mass = B.sparse_targets(z, rows, B.BankIndex(bank, kind), bank_rows, topk=1, tau=0.05,
                                            exact_normaliser=exact, tail_samples=50, rng=np.random.default_rng(0))
        assert cols[:, 0].tolist() == [1, 2, 3]
        expected = [ref[i][i + 1] for i in range(3)]
        assert np.allclose(logp[:, 0], expected, atol=1e-4), (exact, logp[:, 0], expected)
        assert np.all(mass < 0.99)


def test_a_large_top_k_sizes_the_chunks_and_the_search_runs_a_chunk_at_a_time() -> None:
    """With the sampled normaliser the chunk was sized by the tail sample alone, and FAISS searched the whole
    batch at once: a large top-k made [batch, topk] arrays whatever the budget. The same targets come out of
    one-row chunks as of one chunk."""
    z, rows, bank, bank_rows = _targets_case()
    index = B.BankIndex(bank, "flat")

    def run(budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return B.sparse_targets(z, rows, index, bank_rows, topk=300, tau=0.05, exact_normaliser=False,
                                tail_samples=20, rng=np.random.default_rng(3), max_logits_bytes=budget)

    # the chunk's rows x (1 + topk) entries stay within the budget, at K = 65,536 as here
    for K, topk, m, dense in ((65_536, 4096, 1024, False), (65_536, 4096, 1024, True), (600, 300, 20, False)):
        n = B.targets_chunk_rows(K, topk, m, dense)
        assert n * B.TOPK_COLUMNS * (1 + topk) * 4 <= B.LOGITS_BUDGET and n * (K + 1 if dense else 4 * m) * 4 <= B.LOGITS_BUDGET
    assert B.targets_chunk_rows(65_536, 64, 1024, True) == 1023                 # at the defaults, the logits decide
    assert B.targets_chunk_rows(600, 300, 20, False, 7 * 4 * B.TOPK_COLUMNS * 301) == 7
    whole, seven = run(1 << 30), run(7 * 4 * B.TOPK_COLUMNS * 301)
    assert np.array_equal(whole[0], seven[0])
    assert np.allclose(whole[1], seven[1], atol=1e-5) and np.allclose(whole[2], seven[2], atol=1e-6)


def test_an_ivf_search_too_narrow_for_the_top_k_is_named_with_the_nprobe_that_fills_it() -> None:
    """IVF reads about nprobe x K / lists bank entries a view: past that, the top-k is padded with -1. The stage
    warns with a ``bank.nprobe`` that fills it, and that setting does (all but a few columns found)."""
    bank, q = _unit(4096, 32, 15), _unit(40, 32, 16)
    assert B.ivf_shortfall(64, 4096, 0, 16) is None                        # the defaults: 256 entries read
    message = B.ivf_shortfall(1024, 4096, 0, 16)
    assert message is not None and "reads about 256 bank entries a view (bank.nprobe=16 of 256 lists" in message
    need = int(message.split("set bank.nprobe=")[1].split()[0])
    assert need == 128 and B.ivf_shortfall(1024, 4096, 0, need) is None
    narrow = B.BankIndex(bank, "ivf", nprobe=16).search(q, 1024)[1]
    wide = B.BankIndex(bank, "ivf", nprobe=need).search(q, 1024)[1]
    assert (narrow < 0).mean() > 0.5 and (wide < 0).mean() < 0.01, ((narrow < 0).mean(), (wide < 0).mean())
