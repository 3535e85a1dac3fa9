"""One-shot GPU check and benchmark: every figure the borrowed GPU machine can give in ~5 minutes.

    python3 bench/gpu_check.py --out DIR            # on the GPU machine (via bench/gpu.sh)
    python bench/gpu_check.py --smoke --out DIR     # tiny sizes on the CPU, to test the script itself

Sections (each one is wrapped: a failure prints its traceback, records the error and the script
goes on; results are rewritten after every section to DIR/gpu.json and DIR/gpu.md):

  a environment     GPU, versions, CPU count, matmul precision settings
  b shards          Fashion-MNIST upscaled to ImageNet-like sizes (333-640 px sides), JPEG q90, tar shards
  c decode          PIL decode (seed.shards.decode_image) on one thread vs nvJPEG batched decode
  d augment         seed.augment.apply_batch at 224 px: one CPU thread vs CUDA, and their max difference
  e loss_autocast   seed.loss.teacher_probs with a near-duplicate bank entry: fp32 vs bf16 autocast
  f teacher_*       the teacher stage (resnet50 @ 224, resnet10t @ 32) vs the pure teacher forward; resnet50
                    also with no worker processes (one background thread reads, decodes and augments)
  g bank            the bank stage (bank.index=torch) and sparse_targets at a large K
  h student         the student stage loop (resnet18 @ 224; automatic path and CPU workers) vs in-memory steps
  j replay          cached views replayed by the student path (GPU and CPU), re-embedded, against the cache
  i loss_tf32       section e with fp32 matmuls in TF32 (CUDA only; last, as it flips a global setting and back)

The ``*_pre_fix_formula`` figures of sections e and i reproduce the loss as it was before
``seed.loss.dplus_logits``: the D+ matmul computed under the surrounding autocast (or TF32) setting
instead of always in float32, for comparison with ``teacher_probs`` as it is now.

Sizes adapt to the measured CPU cost so the teacher stages cannot run away, and sections marked
heavy are skipped once the total elapsed time passes ``--guard`` seconds (420 by default).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.io as tvio

from bench.common import jpeg_shards, storage as make_storage, teacher_checkpoint
from pipeline import bank as bank_stage, student as student_stage, teacher as teacher_stage
from seed import cache
from seed.augment import apply_batch
from seed.views import Recipe, draw_views
from seed.bank import BankIndex, sparse_targets
from seed.config import RunConfig, load_config
from seed.loss import seed_loss_sparse, teacher_probs
from seed.models import mlp_encoder
from seed.shards import INFO_FILE, decode_image, iter_shard
from seed.teachers import load_teacher


@dataclasses.dataclass
class Sizes:
    n_images: int = 2048          # real Fashion-MNIST images, upscaled
    per_shard: int = 256
    min_side: int = 333
    max_side: int = 640
    jpeg_quality: int = 90
    decode_cap_s: float = 25.0    # PIL decode timing stops after this long
    gpu_decode_batch: int = 128
    tv_cpu_decode: int = 256      # images for torchvision's CPU decode_jpeg (one thread)
    aug_batch: int = 256          # views per apply_batch call
    aug_cpu_batches: int = 2
    aug_cuda_batches: int = 5
    aug_resolution: int = 224
    loss_K: int = 4096
    loss_B: int = 64
    teacher_batch: int = 256
    views: int = 2
    r50_budget_s: float = 75.0    # estimated CPU-side cost cap of the resnet50 @ 224 stage
    r10t_budget_s: float = 40.0
    r50_pure_batches: int = 10
    r10t_pure_batches: int = 40
    bank_K: int = 4096
    sparse_K: int = 65536
    sparse_B: int = 4096
    sparse_reps: int = 3
    train_batch: int = 256
    shuffle_buffer: int = 256
    step_batch: int = 256
    step_warmup: int = 3
    step_timed: int = 10
    step_K: int = 4096
    step_topk: int = 64
    workers: int = 12             # CPU processes for the worker variants of the teacher stage and student loop
    teacher_procs: tuple[int, ...] = (1, 2, 4)  # seed teacher --procs N (on one GPU: N processes share it)


SMOKE = Sizes(n_images=64, per_shard=32, decode_cap_s=10.0, gpu_decode_batch=16, tv_cpu_decode=16, aug_batch=32,
              aug_cpu_batches=1, aug_cuda_batches=2, loss_K=1024, loss_B=8, teacher_batch=32, r50_budget_s=60.0,
              r10t_budget_s=30.0, r50_pure_batches=1, r10t_pure_batches=2, bank_K=4096, sparse_K=4096,
              sparse_B=256, sparse_reps=1, train_batch=32, shuffle_buffer=32, step_batch=8, step_warmup=1,
              step_timed=2, step_K=1024, step_topk=32, workers=2,
              teacher_procs=(2,))


class Check:
    """One run: sizes, device and scratch directory, what sections hand on to later ones, and the results
    (gpu.json and gpu.md, rewritten after every section)."""

    def __init__(self, out: Path, device: torch.device, S: Sizes, guard_s: float, only: set[str] | None):
        self.out, self.device, self.S, self.guard_s, self.only = out, device, S, guard_s, only
        self.cuda = device.type == "cuda"
        self.root = Path(tempfile.mkdtemp(prefix="seed-gpu-check-"))
        self.data: dict[str, dict[str, Any]] = {}
        self.t0 = time.perf_counter()
        self.shard_dir: Path | None = None
        self.n_shards = 0
        self.decoded: list[torch.Tensor] = []     # the first aug_batch images, PIL-decoded, uint8 CHW
        self.keys: list[str] = []
        self.blobs: list[torch.Tensor] = []       # their JPEG bytes as uint8 tensors
        self.decode_s_per_img: float | None = None
        self.aug_s_per_view: float | None = None   # one CPU thread, at S.aug_resolution
        self.r50_cfg: RunConfig | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, name: str, fn: Callable[[dict[str, Any]], None], heavy: bool = False) -> None:
        """Run one section (``heavy``: skipped past the time guard), print its figures, rewrite the results."""
        if self.only and name not in self.only and name.split("_")[0] not in self.only:
            return
        res: dict[str, Any] = {}
        print(f"\n=== {name} (t={self.elapsed():.0f} s) ===", flush=True)
        if heavy and self.elapsed() > self.guard_s:
            res["skipped"] = f"time guard: {self.elapsed():.0f} s elapsed > {self.guard_s:.0f} s"
        else:
            t = time.perf_counter()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                fn(res)  # fills res as it goes: figures measured before a failure are kept
            except Exception as exc:  # noqa: BLE001
                res["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                traceback.print_exc()
                sys.stdout.flush()
            res["section_s"] = round(time.perf_counter() - t, 2)
            if self.cuda:
                res["cuda_peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        for k, v in _flatten(res).items():
            if not k.startswith("detail."):
                print(f"  {name}.{k} = {_fmt(v)}", flush=True)
        self.data[name] = res
        self.data.setdefault("_meta", {})["elapsed_s"] = round(self.elapsed(), 1)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "gpu.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.out / "gpu.json")
        lines = ["| section | figure | value |", "|---|---|---|"]
        for section, res in self.data.items():
            for key, value in _flatten(res).items():
                if key.startswith(("sizes.", "detail.")):
                    continue  # in gpu.json only
                lines.append(f"| {section} | {key} | {_fmt(value).replace('|', '/')} |")
        (self.out / "gpu.md").write_text("\n".join(lines) + "\n")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return str(v)
        return f"{v:.6g}" if abs(v) < 1e5 else f"{v:.0f}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    s = str(v)
    return s if len(s) < 300 else s[:300] + " ..."


def attempt(res: dict[str, Any], key: str, fn: Callable[[], None]) -> None:
    """Run one half of a section; its failure is recorded as ``<key>_error`` and the section goes on."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        res[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"--- {key} failed:", flush=True)
        traceback.print_exc()
        sys.stdout.flush()


def rate(fn: Callable[[], Any], reps: int, per_call: int, device: torch.device | str) -> float:
    """Items per second over ``reps`` calls of ``fn`` (``per_call`` items each), CUDA synchronised around them."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return reps * per_call / (time.perf_counter() - t)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_config(st: Check, arch: str, resolution: int, n_shards: int, *extra: str) -> RunConfig:
    """The run config of one stage pass over the first ``n_shards`` shards: every override lives here."""
    S = st.S
    bank_size = min(S.bank_K, n_shards * S.per_shard)
    dev = st.device.type
    return load_config(None, [
        f"data.train=jpeg/train-{{000000..{n_shards - 1:06d}}}.tar",
        f"teacher.arch={arch}", f"teacher.checkpoint={teacher_checkpoint(st.root, arch)}",
        f"cache.name={arch}-{resolution}", f"cache.views={S.views}", f"cache.resolution={resolution}",
        f"cache.batch_size={S.teacher_batch}", f"cache.device={dev}",
        "bank.index=torch", f"bank.size={bank_size}", f"bank.topk={min(64, bank_size)}",
        "train.students=[{arch: resnet18}]", f"train.optim.batch_size={S.train_batch}", "train.optim.epochs=1",
        f"train.loader.shuffle_buffer={S.shuffle_buffer}", f"train.device={dev}", "train.run=gpu-check", *extra,
    ])


def sec_environment(st: Check, res: dict[str, Any]) -> None:
    """What the figures were measured on: Python, CPUs, torch and CUDA, the GPU, fp32 precision, versions."""
    res.update(python=platform.python_version(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
               device=str(st.device), torch=torch.__version__, torch_cuda=torch.version.cuda,
               cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        res.update(gpu=torch.cuda.get_device_name(),
                   gpu_mem_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version(), cudnn_benchmark=torch.backends.cudnn.benchmark)
    res["matmul_fp32_precision"] = torch.backends.cuda.matmul.fp32_precision     # torch >= 2.9 API
    res["cudnn_conv_fp32_precision"] = torch.backends.cudnn.conv.fp32_precision
    for mod in ("torchvision", "timm", "numpy", "PIL", "zarr", "numcodecs", "webdataset", "fsspec", "faiss"):
        try:  # faiss is optional (the bank's torch index needs none)
            res[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception as exc:  # noqa: BLE001
            res[mod] = f"not importable ({type(exc).__name__}: {exc})"[:200]
    res["project_import_errors"] = "none"  # plain imports: the script stops before section a otherwise


def sec_shards(st: Check, res: dict[str, Any], data: Path) -> None:
    """Cost of making ImageNet-sized JPEG tar shards from Fashion-MNIST (encode threads, shard writing)."""
    S = st.S
    out = jpeg_shards(st.root, S.n_images, S.per_shard, S.min_side, S.max_side, S.jpeg_quality,
                      source=data if data.exists() else None)
    gen = json.loads((out / INFO_FILE).read_text())["generation"]
    (st.root / "jpeg").symlink_to(out.name, target_is_directory=True)          # make_config reads jpeg/
    st.shard_dir, st.n_shards = out, gen["shards"]
    res.update({k: gen[k] for k in ("images", "writer", "shards", "per_shard", "mean_jpeg_bytes", "mean_pixels",
                                    "encode_s", "encode_threads", "write_s", "generation_s")})


def _shard_urls(st: Check) -> list[str]:
    if st.shard_dir is None:
        raise RuntimeError("no shards (section b failed)")
    return sorted(str(p) for p in st.shard_dir.glob("train-*.tar"))


def sec_decode(st: Check, res: dict[str, Any]) -> None:
    """JPEG decode rate: the project's PIL decode and torchvision's CPU decode on one thread, nvJPEG in batches."""
    S = st.S
    t = time.perf_counter()
    samples = [s for url in _shard_urls(st) for s in iter_shard(url)]
    res.update(iter_shard_samples=len(samples), iter_shard_s=round(time.perf_counter() - t, 3))

    t = time.perf_counter()
    n = 0
    for s in samples:
        im = decode_image(s)
        if len(st.decoded) < S.aug_batch:
            st.decoded.append(im)
            st.keys.append(s.key)
        n += 1
        if time.perf_counter() - t > S.decode_cap_s:
            break
    pil_s = time.perf_counter() - t
    st.decode_s_per_img = pil_s / n
    res.update(pil_images=n, pil_images_per_s_1thread=round(n / pil_s, 1))

    blobs = [torch.from_numpy(np.frombuffer(s.image, dtype=np.uint8).copy()) for s in samples if s.image is not None]
    st.blobs = blobs[: S.aug_batch]                                           # encoded twins of st.decoded

    def tv_cpu() -> None:
        m = min(S.tv_cpu_decode, len(blobs))

        def decode_all() -> None:
            for b in blobs[:m]:
                tvio.decode_jpeg(b)

        with one_thread():
            tvio.decode_jpeg(blobs[0])
            res["torchvision_cpu_images_per_s_1thread"] = round(rate(decode_all, 1, m, "cpu"), 1)

    attempt(res, "torchvision_cpu", tv_cpu)
    if not st.cuda:
        res["nvjpeg"] = "skipped: no CUDA"
        return

    def nvjpeg() -> None:
        res["torchvision"] = torchvision.__version__
        B = S.gpu_decode_batch
        batches = [blobs[i:i + B] for i in range(0, len(blobs), B)]
        out = tvio.decode_jpeg(batches[0], device="cuda")                    # warm-up (nvJPEG handles)
        torch.cuda.synchronize()
        res["nvjpeg_first_shape"] = list(out[0].shape)
        res["nvjpeg_vs_pil_max_abs_diff"] = int((out[0].cpu().int() - decode_image(samples[0]).int()).abs().max())

        def decode_all() -> None:
            for b in batches:
                tvio.decode_jpeg(b, device="cuda")

        res["nvjpeg_batch"] = B
        res["nvjpeg_images_per_s"] = round(rate(decode_all, 1, len(blobs), "cuda"), 1)
        res["nvjpeg_over_pil"] = round(res["nvjpeg_images_per_s"] / res["pil_images_per_s_1thread"], 1)

    attempt(res, "nvjpeg", nvjpeg)


def _aug_batch(st: Check, recipe: Recipe, offset: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``aug_batch`` views: V views each of consecutive decoded images (as the teacher stage batches them)."""
    S, n = st.S, len(st.decoded)
    images, rows = [], []
    for i in range(offset, offset + math.ceil(S.aug_batch / S.views)):
        im = st.decoded[i % n]
        key = f"{st.keys[i % n]}-{i // n}"
        rows.append(draw_views(recipe, seed=0, key=key, views=S.views, height=im.shape[-2], width=im.shape[-1]))
        images += [im] * S.views
    return images[: S.aug_batch], torch.from_numpy(np.concatenate(rows)[: S.aug_batch])


def sec_augment(st: Check, res: dict[str, Any]) -> None:
    """apply_batch views/s at 224 px: one CPU thread, all CPU threads, CUDA (images on GPU or CPU), nvJPEG + CUDA;
    and how far the CUDA output is from the CPU one."""
    S = st.S
    if not st.decoded:                                                        # section c did not run
        for s in (s for url in _shard_urls(st) for s in iter_shard(url)):
            st.decoded.append(decode_image(s))
            st.keys.append(s.key)
            if len(st.decoded) >= S.aug_batch:
                break
    recipe, r, reps = Recipe(), S.aug_resolution, S.aug_cuda_batches
    res.update(resolution=r, batch_views=S.aug_batch)
    batches = [_aug_batch(st, recipe, k * S.aug_batch // S.views) for k in range(max(S.aug_cpu_batches, 1))]
    cpu_out: dict[str, torch.Tensor] = {}

    def cpu() -> None:
        with one_thread():
            ims, p = batches[0]
            apply_batch(ims[:8], p[:8], recipe, r)                              # small warm-up
            t = time.perf_counter()
            for k, (ims, p) in enumerate(batches):
                y = apply_batch(ims, p, recipe, r)
                if k == 0:
                    cpu_out["y"] = y
            dt = time.perf_counter() - t
        views = len(batches) * S.aug_batch
        st.aug_s_per_view = dt / views
        res["cpu_views_per_s_1thread"] = round(views / dt, 1)
        all_threads = rate(lambda: apply_batch(*batches[0], recipe, r), 1, S.aug_batch, "cpu")
        res[f"cpu_views_per_s_{torch.get_num_threads()}threads"] = round(all_threads, 1)

    attempt(res, "cpu", cpu)
    if not st.cuda:
        res["cuda"] = "skipped: no CUDA"
        return

    def cuda() -> None:
        ims, p = batches[0]
        ims_c = [im.cuda() for im in ims]
        p_c = p.cuda()
        y = apply_batch(ims_c, p, recipe, r, "cuda")                            # warm-up; rows on the host
        apply_batch(ims_c, p_c, recipe, r)
        res["cuda_output_device"] = str(y.device)
        res["cuda_views_per_s"] = round(rate(lambda: apply_batch(ims_c, p, recipe, r, "cuda"), reps, S.aug_batch, "cuda"), 1)
        res["cuda_views_per_s_rows_on_gpu"] = round(rate(lambda: apply_batch(ims_c, p_c, recipe, r), reps, S.aug_batch,
                                                         "cuda"), 1)
        # Does the call wait for the GPU? Host syncs counted by torch's sync debug mode, and the time the call takes
        # to return while the GPU is still busy with ~50 ms of earlier work (what the teacher's forward is to it).
        for name, rows in (("rows_on_host", p), ("rows_on_gpu", p_c)):
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    apply_batch(ims_c, rows, recipe, r, "cuda")
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            res[f"host_syncs_{name}"] = len(syncs)
            res[f"host_sync_sites_{name}"] = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
            torch.cuda.synchronize()
            torch.cuda._sleep(_busy_cycles(50.0))
            t = time.perf_counter()
            apply_batch(ims_c, rows, recipe, r, "cuda")
            res[f"queue_ms_behind_busy_gpu_{name}"] = round((time.perf_counter() - t) * 1e3, 2)
            torch.cuda.synchronize()
        if "cpu_views_per_s_1thread" in res:
            res["cuda_over_cpu_1thread"] = round(res["cuda_views_per_s"] / res["cpu_views_per_s_1thread"], 1)
        if "y" in cpu_out:
            d = (y.float().cpu() - cpu_out["y"]).abs()
            res.update(cpu_vs_cuda_max_abs_diff=float(d.max()), cpu_vs_cuda_mean_abs_diff=float(d.mean()),
                       cpu_vs_cuda_frac_over_1_255=float((d > 1 / 255).float().mean()))
        # Images left on the CPU, parameters on CUDA: apply_batch copies each size group itself.
        on_cpu = rate(lambda: apply_batch(ims, p_c, recipe, r), reps, S.aug_batch, "cuda")
        res["cuda_views_per_s_images_on_cpu"] = round(on_cpu, 1)

    def gpu_path() -> None:
        # The whole view path on the GPU: nvJPEG decode of the batch's images, then apply_batch on CUDA.
        n_img = math.ceil(S.aug_batch / S.views)
        if len(st.blobs) < n_img:
            raise RuntimeError(f"only {len(st.blobs)} encoded images kept by section c, need {n_img}")
        p = batches[0][1]

        def once() -> None:
            ims = tvio.decode_jpeg(st.blobs[:n_img], device="cuda")
            apply_batch([ims[i // S.views] for i in range(S.aug_batch)], p, recipe, r, "cuda")

        once()
        res["gpu_decode_plus_augment_views_per_s"] = round(rate(once, reps, S.aug_batch, "cuda"), 1)

    attempt(res, "cuda", cuda)
    attempt(res, "gpu_path", gpu_path)


def _busy_cycles(ms: float) -> int:
    """GPU clock cycles that ``torch.cuda._sleep`` spins for ``ms`` milliseconds (calibrated here)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return int(10_000_000 * ms / start.elapsed_time(end))


def _near_duplicates(z: torch.Tensor, cos: float, g: torch.Generator) -> torch.Tensor:
    """Unit vectors at cosine ``cos`` to each row of the unit ``z``."""
    u = torch.randn(z.shape, generator=g, dtype=torch.float64)
    u = F.normalize(u - (u * z).sum(1, keepdim=True) * z, dim=1)
    return cos * z + math.sqrt(1 - cos * cos) * u


@contextlib.contextmanager
def _tf32_matmul() -> Iterator[None]:
    """fp32 CUDA matmuls in TF32 for the block."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def _probs_pre_fix(z_t: torch.Tensor, bank: torch.Tensor, tau: float) -> torch.Tensor:
    """teacher_probs as written before ``seed.loss.dplus_logits``: the matmul follows the autocast/TF32 state."""
    l_pos = (z_t * z_t).sum(dim=1, keepdim=True)
    l_neg = z_t @ bank.T
    return torch.softmax(torch.cat([l_pos, l_neg], dim=1) / tau, dim=1)


def sec_loss(st: Check, res: dict[str, Any], tf32: bool = False) -> None:
    """p_T of the positive (column 0) with a near-duplicate in the bank, per cosine and precision.

    fp32 vs bf16 autocast on the CPU and CUDA; with ``tf32``, only CUDA with fp32 matmuls in TF32
    (run last: it flips a global matmul setting and back). ``p0_mean_by_cosine`` sums it up.
    """
    S = st.S
    B, K, D, tau = S.loss_B, S.loss_K, 128, 1e-4
    res["B"], res["K"], res["D"], res["tau_t"] = B, K, D, tau
    g = torch.Generator().manual_seed(0)
    z64 = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    noise = F.normalize(torch.randn(K, D, generator=g), dim=1)
    devices = (["cuda"] if st.cuda else []) if tf32 else ["cpu"] + (["cuda"] if st.cuda else [])
    if not st.cuda:
        res["cuda"] = "skipped: no CUDA"
        if tf32:
            return
    cosines = (0.99, 0.998, 0.9988, 0.9995, 0.9999)
    res["cosines"] = list(cosines)
    summary: dict[str, dict[str, list[float]]] = {}                           # device -> variant -> p0_mean per cosine

    def column0(fn: Callable[[], torch.Tensor]) -> dict[str, float]:
        p = fn().float()[:, 0].cpu()
        return {"p0_mean": float(p.mean()), "p0_min": float(p.min()), "frac_p0_below_0.9": float((p < 0.9).float().mean())}

    def measure(dev: str, zd: torch.Tensor, bd: torch.Tensor, tag: str) -> None:
        out: dict[str, Any] = {}
        if tf32:
            with _tf32_matmul():
                out["tf32"] = column0(lambda: teacher_probs(zd, bd, tau))
                out["tf32_pre_fix_formula"] = column0(lambda: _probs_pre_fix(zd, bd, tau))
                out["tf32_matmul_dup_logit_mean"] = float((zd @ bd[:B].T).diagonal().float().mean())
        else:
            out["fp32"] = column0(lambda: teacher_probs(zd, bd, tau))
            with torch.autocast(dev, dtype=torch.bfloat16):
                out["bf16_autocast"] = column0(lambda: teacher_probs(zd, bd, tau))
                out["bf16_autocast_pre_fix_formula"] = column0(lambda: _probs_pre_fix(zd, bd, tau))
                dup = (zd @ bd[:B].T).diagonal()                                  # each row's near-duplicate
            out["bf16_matmul_dup_logit_mean"] = float(dup.float().mean())
        res.setdefault("detail", {}).setdefault(dev, {})[tag] = out
        for variant, v in out.items():
            summary.setdefault(dev, {}).setdefault(variant, []).append(v["p0_mean"] if isinstance(v, dict) else v)

    z = z64.float()
    for cos in cosines:
        bank = noise.clone()
        bank[:B] = _near_duplicates(z64, cos, g).float()                      # row b's near-duplicate is column 1 + b
        for dev in devices:
            attempt(res, f"{dev}_cos{cos}", lambda: measure(dev, z.to(dev), bank.to(dev), f"cos{cos}"))
    res["p0_mean_by_cosine"] = summary
    res["expected_fp32_p0_at_0.9988"] = float(1 / (1 + math.exp(-(1 - 0.9988) / tau)))


def _stage_shards(st: Check, resolution: int, budget_s: float, res: dict[str, Any]) -> int:
    """How many shards keep the stage's estimated CPU work (decode + augment, one thread) under budget."""
    if st.n_shards == 0:
        raise RuntimeError("no shards (section b failed)")
    S = st.S
    if st.decode_s_per_img is None or st.aug_s_per_view is None:
        res["shard_cap"] = "no CPU estimate; all shards"
        return st.n_shards
    per_img = st.decode_s_per_img + S.views * st.aug_s_per_view * (resolution / S.aug_resolution) ** 2
    n = max(1, min(st.n_shards, int(budget_s / (per_img * S.per_shard))))
    res["estimated_cpu_s_per_image_1thread"] = round(per_img, 5)
    res["shards_used"] = f"{n} of {st.n_shards}"
    return n


def _pure_forward(cfg: RunConfig, st: Check, batch: int, resolution: int, batches: int) -> float:
    """Views/s of the teacher alone on a random batch: on CUDA channels_last + bf16 autocast, inference_mode."""
    teacher, _ = load_teacher(cfg.teacher)
    teacher = teacher.to(st.device)
    x = torch.rand(batch, 3, resolution, resolution, device=st.device)
    if st.cuda:
        teacher = teacher.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def fwd() -> None:
        with torch.inference_mode(), torch.autocast(st.device.type, dtype=torch.bfloat16, enabled=st.cuda):
            F.normalize(teacher(x).float(), dim=1)

    for _ in range(2 if st.cuda else 1):
        fwd()
    return rate(fwd, batches, batch, st.device)


def sec_teacher(st: Check, res: dict[str, Any], arch: str, resolution: int, budget_s: float, pure_batches: int,
                workers: int = -1) -> None:
    """Views/s of the teacher stage (pipeline.teacher.run over the shards) against the bare teacher forward.

    ``workers`` -1: the stage's automatic choice (half the cores; on CUDA they read shards and draw
    views, and the GPU decodes with nvJPEG and augments); 0: one background thread does all of it.
    """
    S = st.S
    n = _stage_shards(st, resolution, budget_s, res)
    cfg = make_config(st, arch, resolution, n, f"cache.workers={workers}", f"cache.name={arch}-{resolution}-w{workers}")
    res["workers"] = workers
    res["arch"], res["resolution"], res["views"], res["batch"] = arch, resolution, S.views, S.teacher_batch
    res["device"] = cfg.cache.device

    def stage() -> None:
        t = time.perf_counter()
        result = teacher_stage.run(cfg, make_storage(st.root), overwrite=True, progress=False)
        wall = time.perf_counter() - t
        totals = result.totals
        if totals is None:
            raise RuntimeError(f"teacher cache {result.cache} not complete")
        views = totals["teacher_forwards"]
        res.update(stage_views=views, stage_wall_s=round(wall, 2), stage_views_per_s=round(views / wall, 1),
                   stage_shard_seconds=totals["stage_seconds"], stage_forward_seconds=totals["teacher_seconds"],
                   skipped_images=totals["skipped"])
        group = cache.open_group(result.cache)
        res["stage_forward"] = sorted({str((cache.shard_record(group, i) or {}).get("forward", "?"))
                                       for i in cache.done_shards(group)})  # eager or cuda graph
        if arch == "resnet50" and workers == -1:
            st.r50_cfg = cfg

    def pure() -> None:
        pure_rate = _pure_forward(cfg, st, S.teacher_batch, resolution, pure_batches)
        res["pure_forward_views_per_s"] = round(pure_rate, 1)
        if "stage_views_per_s" in res:
            res["stage_over_pure"] = round(res["stage_views_per_s"] / pure_rate, 3)

    attempt(res, "stage", stage)
    attempt(res, "pure", pure)
    if st.cuda:
        torch.cuda.empty_cache()


def sec_bank(st: Check, res: dict[str, Any]) -> None:
    """The bank stage over the resnet50 cache (torch index), and sparse_targets vs bare search at a large K."""
    S = st.S

    def stage() -> None:
        if st.r50_cfg is None:
            raise RuntimeError("no resnet50 cache (teacher_r50 failed or was skipped)")
        cfg = st.r50_cfg
        res["K"], res["topk"], res["index"] = cfg.bank.size, cfg.bank.topk, cfg.bank.index
        t = time.perf_counter()
        summary = bank_stage.run(cfg, make_storage(st.root), progress=False).summary
        res["wall_s"] = round(time.perf_counter() - t, 2)
        res.update({k: summary[k] for k in ("device", "views", "seconds", "targets_seconds", "views_per_s",
                                            "faiss_gpu", "normaliser")},
                   mass_mean=summary["fidelity"]["mass"]["mean"], kl_mean=summary["fidelity"]["kl"]["mean"])

    def large_k() -> None:
        K, B, D = S.sparse_K, S.sparse_B, 128
        g = torch.Generator().manual_seed(1)
        vectors = F.normalize(torch.randn(K, D, generator=g), dim=1).numpy()
        z = F.normalize(torch.randn(B, D, generator=g), dim=1).numpy()
        index = BankIndex(vectors, "torch", device=st.device)
        q_rows = np.arange(B, dtype=np.int64) * 7
        bank_rows = np.arange(K, dtype=np.int64)

        def targets() -> None:
            sparse_targets(z, q_rows, index, bank_rows, topk=64, tau=1e-4, exact_normaliser=True)

        targets()                                                             # warm-up
        res["sparse_K"], res["sparse_B"] = K, B
        res["sparse_targets_views_per_s"] = round(rate(targets, S.sparse_reps, B, "cpu"), 1)
        res["index_search_only_views_per_s"] = round(rate(lambda: index.search(z, 64), S.sparse_reps, B, "cpu"), 1)
        # bank.index=flat on this device: by faiss-gpu when installed, else its top-k from the normaliser's product on
        # the GPU (flat_on_device, as torch); and the FAISS CPU search that path replaces, on the same queries
        try:
            flat = BankIndex(vectors, "flat", device=st.device)
        except ImportError as exc:
            res["flat_skipped"] = f"faiss not importable: {exc}"
            return
        res["flat_faiss_gpu"], res["flat_on_device"] = flat.on_gpu, flat.on_device
        on_cpu = BankIndex(vectors, "flat")
        res["flat_cpu_search_only_views_per_s"] = round(rate(lambda: on_cpu.search(z, 64), S.sparse_reps, B, "cpu"), 1)

        def flat_targets() -> None:
            sparse_targets(z, q_rows, flat, bank_rows, topk=64, tau=1e-4, exact_normaliser=True)

        flat_targets()
        res["sparse_targets_flat_views_per_s"] = round(rate(flat_targets, S.sparse_reps, B, "cpu"), 1)

    attempt(res, "stage", stage)
    attempt(res, "sparse_large_K", large_k)


def sec_student(st: Check, res: dict[str, Any], loop_workers: int) -> None:
    """ms per step of the student stage loop (resnet18 @ 224 on the resnet50 cache) against in-memory steps
    on a fixed batch: bare (no loss work) and cached SEED (seed_loss_sparse). The loop runs with the
    automatic data path (on CUDA: nvJPEG + GPU augmentation in a background thread) and with
    ``loop_workers`` CPU processes decoding and augmenting."""
    S = st.S
    dev = st.device

    def loop(workers: int) -> None:
        if st.r50_cfg is None:
            raise RuntimeError("no resnet50 cache (teacher_r50 failed or was skipped)")
        cfg = dataclasses.replace(st.r50_cfg, train=dataclasses.replace(
            st.r50_cfg.train, run=f"gpu-check-w{workers}",
            loader=dataclasses.replace(st.r50_cfg.train.loader, workers=workers)))
        t = time.perf_counter()
        result = student_stage.run(cfg, make_storage(st.root), progress=False)
        tag = "" if workers == -1 else f"_w{workers}"
        res[f"loop{tag}_wall_s"] = round(time.perf_counter() - t, 2)
        m = result.metrics[-1]
        res.update({f"loop{tag}_steps": m["steps"], f"loop{tag}_ms_per_step": round(m["seconds"] / m["steps"] * 1000, 1),
                    f"loop{tag}_images_per_s": m["images_per_s"], f"loop{tag}_loss": m["loss"]})

    res["loop_batch"] = S.train_batch
    attempt(res, "loop", lambda: loop(-1))
    if st.cuda:
        res[f"loop_w{loop_workers}"] = "not measured: on CUDA training decodes and augments on the GPU, workers unused"
    else:
        attempt(res, f"loop_w{loop_workers}", lambda: loop(loop_workers))

    B, K, k = S.step_batch, S.step_K, S.step_topk
    torch.manual_seed(0)
    student = mlp_encoder("resnet18", 128).to(dev)
    x = torch.rand(B, 3, 224, 224, device=dev)
    if st.cuda:
        student = student.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    bank = F.normalize(torch.randn(K, 128, device=dev), dim=1)
    z_t = F.normalize(torch.randn(B, 128, device=dev), dim=1)
    cols = torch.cat([torch.zeros(B, 1, dtype=torch.long), torch.randint(1, K + 1, (B, k - 1))], dim=1).to(dev)
    logp = torch.full((B, k), -12.0, device=dev)
    logp[:, 0] = -1e-3
    rows = torch.randint(0, 10 * K, (B,), device=dev)
    bank_rows = torch.randint(0, 10 * K, (K,), device=dev)
    own = rows[:, None] == bank_rows[None, :]
    res["step_batch"], res["step_K"], res["step_topk"] = B, K, k

    def ms_per_step(loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
        def step() -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=st.cuda):
                loss = loss_fn(F.normalize(student(x).float(), dim=1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(S.step_warmup):
            step()
        return 1000 / rate(step, S.step_timed, 1, dev)

    def bare() -> None:
        res["bare_ms"] = round(ms_per_step(lambda z: z.sum(dim=1).mean()), 2)

    def cached() -> None:
        res["cached_ms"] = round(ms_per_step(lambda z: seed_loss_sparse(z, z_t, bank, cols, logp, 0.2, own)), 2)

    attempt(res, "bare", bare)
    attempt(res, "cached", cached)
    if "bare_ms" in res:
        if "cached_ms" in res:
            res["cached_over_bare"] = round(res["cached_ms"] / res["bare_ms"], 3)
        scale = B / S.train_batch
        for tag in ("", f"_w{loop_workers}"):
            if f"loop{tag}_ms_per_step" in res:
                res[f"loop{tag}_over_bare"] = round(res[f"loop{tag}_ms_per_step"] * scale / res["bare_ms"], 3)
        if scale != 1:
            res["loop_over_bare_note"] = f"loop ms scaled by {B}/{S.train_batch} (step batch / loop batch)"


def sec_replay(st: Check, res: dict[str, Any]) -> None:
    """The replay contract on this device: cached views of the resnet50 cache (made by the automatic
    path) replayed by the student's data path, on the GPU (nvJPEG + CUDA augmentation) and on the
    CPU (PIL + CPU augmentation), re-embedded by the teacher and compared with the cached embeddings."""
    import zarr

    from pipeline.teacher import embed
    from seed.data import CachedSource, collate
    from seed.decode import Decoder

    if st.r50_cfg is None:
        raise RuntimeError("no resnet50 cache (teacher_r50 failed or was skipped)")
    cfg = st.r50_cfg
    group = zarr.open_group(make_storage(st.root).cache_url(cfg.cache.name), mode="r")
    teacher, _ = load_teacher(cfg.teacher)
    teacher = teacher.to(st.device)
    if st.cuda:
        teacher = teacher.to(memory_format=torch.channels_last)
    make = CachedSource(group, None, view="random", seed=0, dense=True).load(0, 0)
    url = group.attrs["shard_urls"][0]
    items = [ex for s in iter_shard(url) if (ex := make(s.index, s)) is not None][: st.S.teacher_batch]
    cached = torch.stack([torch.from_numpy(it.extra["z_t"]) for it in items])
    res["views"], res["cache_decode"] = len(items), group.attrs["preprocessing"].get("decode")
    for name, device in (("cuda", st.device), ("cpu", torch.device("cpu"))):
        if name == "cuda" and not st.cuda:
            res[name] = "skipped: no CUDA"
            continue
        batch = collate(items, cfg.cache.recipe, cfg.cache.resolution, Decoder(device), device)
        z = embed(teacher, batch.x, st.device)                                # B x D, float32 on the CPU
        cos = (z * cached).sum(dim=1)
        res[f"{name}_max_abs_diff"] = float((z - cached).abs().max())
        res[f"{name}_min_cosine"] = float(cos.min())
        res[f"{name}_mean_cosine"] = float(cos.mean())


def sec_scale_out(st: Check, res: dict[str, Any]) -> None:
    """The scale-out paths on this machine's GPUs: ``seed teacher --procs N`` (run_processes; more
    processes than GPUs share them) over the resnet50 shards at 8 views, against the in-process stage
    (steady rates from the shard records, so process start-up is left out; wall rates beside them);
    and the student stage through the torchrun launcher (one rank per GPU) against section h's loop."""
    if st.r50_cfg is None:
        raise RuntimeError("no resnet50 cache (teacher_r50 failed or was skipped)")
    storage = make_storage(st.root)
    res["gpus"] = torch.cuda.device_count() if st.cuda else 0

    def steady_rate(url: str) -> float:
        """Views/s from the first shard's start to the last shard's end (process start-up excluded)."""
        import zarr

        from seed import cache

        g = zarr.open_group(url, mode="r")
        records = [cache.shard_record(g, s) for s in range(int(g.attrs["n_shards"]))]
        start = min(r["finished_at"] - r["seconds"] for r in records)
        end = max(r["finished_at"] for r in records)
        return sum(r["teacher_forwards"] for r in records) / (end - start)

    def teacher_procs() -> None:
        # 8 views an image so that each run embeds long enough to measure past the processes' start-up
        base = dataclasses.replace(st.r50_cfg, cache=dataclasses.replace(
            st.r50_cfg.cache, views=8, device="auto" if st.cuda else "cpu", name="r50-v8-in-process"))
        t = time.perf_counter()
        teacher_stage.run(base, storage, overwrite=True, progress=False)
        res["in_process_v8_wall_s"] = round(time.perf_counter() - t, 2)
        res["in_process_v8_steady_views_per_s"] = round(steady_rate(storage.cache_url(base.cache.name)), 1)
        import zarr

        reference = zarr.open_group(storage.cache_url(base.cache.name), mode="r")["embeddings"][:].astype(np.float32)
        for n in st.S.teacher_procs:
            cfg = dataclasses.replace(base, cache=dataclasses.replace(base.cache, name=f"r50-v8-procs{n}"))
            t = time.perf_counter()
            result = teacher_stage.run_processes(cfg, storage, n, overwrite=True, progress=False)
            wall = time.perf_counter() - t
            if result.totals is None:
                raise RuntimeError("cache not complete")
            views = result.totals["teacher_forwards"]
            emb = zarr.open_group(result.cache, mode="r")["embeddings"][:].astype(np.float32)
            ok = np.isfinite(emb) & np.isfinite(reference)
            res[f"procs{n}"] = {"wall_s": round(wall, 2), "views": views, "wall_views_per_s": round(views / wall, 1),
                                "steady_views_per_s": round(steady_rate(result.cache), 1),
                                "max_abs_diff_vs_in_process": float(np.abs(emb[ok] - reference[ok]).max())}

    def student_launch() -> None:
        t_cfg = dataclasses.replace(st.r50_cfg.train, run="gpu-check-launch", nproc=0, device="auto" if st.cuda else "cpu")
        cfg = dataclasses.replace(st.r50_cfg, train=t_cfg)
        t = time.perf_counter()
        lines: list[str] = []
        result = student_stage.launch(cfg, storage, on_line=lines.append)
        m = result.metrics[-1]
        res.update(launch_ranks=student_stage.processes(cfg), launch_wall_s=round(time.perf_counter() - t, 2),
                   launch_steps=m["steps"], launch_ms_per_step=round(m["seconds"] / m["steps"] * 1000, 1),
                   launch_images_per_s=m["images_per_s"], launch_output_tail=lines[-3:])

    attempt(res, "teacher_procs", teacher_procs)
    attempt(res, "student_launch", student_launch)


def sec_evaluate(st: Check, res: dict[str, Any]) -> None:
    """Streaming evaluation on this device: resnet50 features of the JPEG shards at 224 px (one pass,
    the automatic data path), then kNN and the mini-batch probe on them (3/4 train, 1/4 test)."""
    from seed.devices import data_workers
    from seed.evaluate import extract_all, knn_predict, linear_probe, probe_resident

    if st.r50_cfg is None:
        raise RuntimeError("no resnet50 cache (teacher_r50 failed or was skipped)")
    cfg = st.r50_cfg
    teacher, _ = load_teacher(cfg.teacher)
    teacher = teacher.to(st.device)
    if st.cuda:
        teacher = teacher.to(memory_format=torch.channels_last)
    urls = [str(st.root / "jpeg" / f"train-{i:06d}.tar") for i in range(st.n_shards)]
    workers = data_workers(-1, st.device)
    extract_all({"teacher": teacher.features}, urls[:1], 224, st.device, workers=workers)   # warm-up
    t = time.perf_counter()
    out = extract_all({"teacher": teacher.features}, urls, 224, st.device, workers=workers)
    wall = time.perf_counter() - t
    res.update(images=out.n, workers=workers, extract_s=round(wall, 2), extract_images_per_s=round(out.n / wall, 1))
    x, y = out.features["teacher"], out.labels
    # seed evaluate --procs on this device: two parts (every other shard) into one shared file, read back as one
    from seed.evaluate import extract_part, gather_parts
    from seed.features import feature_file
    from seed.shards import count_samples

    lengths = [count_samples(u) for u in urls]
    file = feature_file(tempfile.gettempdir())
    t = time.perf_counter()
    parts = [extract_part({"teacher": teacher.features}, urls, list(range(len(urls)))[i::2], lengths,
                          {"teacher": file.fileno()}, 224, st.device, workers=workers) for i in range(2)]
    whole = gather_parts(parts, {"teacher": file}, 224)
    res["parts_s"] = round(time.perf_counter() - t, 2)
    res["parts_equal_one_pass"] = bool(np.array_equal(whole.labels, y)
                                       and np.array_equal(np.asarray(whole.features["teacher"]), np.asarray(x)))
    res["parts_max_abs_diff"] = float(np.abs(np.asarray(whole.features["teacher"]) - np.asarray(x)).max())
    file.close()
    cut = 3 * len(y) // 4
    t = time.perf_counter()
    weighted, _ = knn_predict(x[:cut], y[:cut], x[cut:], device=st.device)
    res["knn_s"], res["knn_top1"] = round(time.perf_counter() - t, 3), float((weighted == y[cut:]).mean() * 100)
    # the mini-batch probe on the training rows in a feature file of their own (as the stage scores them): held on
    # the device (CUDA's default when they fit, decided before anything of it is cached) and read a batch at a time
    from seed.features import FeatureWriter

    writer = FeatureWriter(tempfile.gettempdir())
    writer.append(np.asarray(x[:cut]))
    train_rows = writer.finish([cut], [0])
    res["probe_resident"] = probe_resident(cut, x.shape[1], st.device)
    linear_probe(train_rows[:256], y[:256], x[cut:], method="sgd", device=st.device)   # warm-up
    times, preds = {}, {}
    for way, resident in (("resident", True), ("file", False)):
        t = time.perf_counter()
        preds[way] = linear_probe(train_rows, y[:cut], x[cut:], method="sgd", device=st.device, resident=resident)
        times[way] = round(time.perf_counter() - t, 2)
    res["probe_sgd_s"], res["probe_sgd_file_s"] = times["resident"], times["file"]
    res["probe_sgd_top1"] = float((preds["resident"] == y[cut:]).mean() * 100)
    res["probe_same_predictions"] = bool(np.array_equal(preds["resident"], preds["file"]))
    train_rows.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-check-out", help="directory for gpu.json and gpu.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (tests this script)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available; cpu with --smoke)")
    parser.add_argument("--data", default=str(ROOT / ".whl" / "fmnist-2048.npz"), help="npz with images and labels")
    parser.add_argument("--guard", type=float, default=420.0, help="skip heavy sections after this many seconds")
    parser.add_argument("--only", default="", help="comma-separated section names or letters prefixes (debugging)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()

    S = SMOKE if args.smoke else Sizes()
    device = torch.device(args.device or ("cpu" if args.smoke else ("cuda" if torch.cuda.is_available() else "cpu")))
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    st = Check(Path(args.out), device, S, args.guard, only)
    st.data["_meta"] = {"argv": sys.argv[1:], "smoke": args.smoke, "sizes": dataclasses.asdict(S),
                        "scratch": str(st.root), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not st.cuda:
        print(f"WARNING: running on {device}; CUDA-only figures are skipped", flush=True)
    try:
        st.run("a_environment", lambda r: sec_environment(st, r))
        st.run("b_shards", lambda r: sec_shards(st, r, Path(args.data)))
        st.run("c_decode", lambda r: sec_decode(st, r))
        st.run("d_augment", lambda r: sec_augment(st, r))
        st.run("e_loss_autocast", lambda r: sec_loss(st, r))
        st.run("f_teacher_r50", lambda r: sec_teacher(st, r, "resnet50", 224, S.r50_budget_s, S.r50_pure_batches),
               heavy=True)
        st.run("f_teacher_r50_thread", lambda r: sec_teacher(st, r, "resnet50", 224, S.r50_budget_s,
                                                               S.r50_pure_batches, workers=0), heavy=True)
        st.run("f_teacher_r10t", lambda r: sec_teacher(st, r, "resnet10t", 32, S.r10t_budget_s, S.r10t_pure_batches),
               heavy=True)
        st.run("g_bank", lambda r: sec_bank(st, r), heavy=True)
        st.run("h_student", lambda r: sec_student(st, r, S.workers), heavy=True)
        st.run("j_replay", lambda r: sec_replay(st, r), heavy=True)
        st.run("k_scale_out", lambda r: sec_scale_out(st, r), heavy=True)
        st.run("l_evaluate", lambda r: sec_evaluate(st, r), heavy=True)
        st.run("i_loss_tf32", lambda r: sec_loss(st, r, tf32=True))
    finally:
        st.data["_meta"]["elapsed_s"] = round(st.elapsed(), 1)
        st.write()
        if not args.keep:
            shutil.rmtree(st.root, ignore_errors=True)
    errors = [k for k, v in st.data.items() if "error" in v]
    print(f"\ndone in {st.elapsed():.0f} s; {len(errors)} section(s) with errors; "
          f"results in {st.out}/gpu.json, {st.out}/gpu.md", flush=True)


if __name__ == "__main__":
    main()
