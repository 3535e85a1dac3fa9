"""Where the teacher stage's data path spends its time on a GPU: a profile, not a benchmark.

    python3 bench/gpu_profile.py --out DIR [--smoke]

Builds the same ImageNet-shaped JPEG shards as ``bench/gpu_check.py`` (section b), then:
  1. the data path alone (tar reading, nvJPEG decode, view drawing, augmentation on the device; no
     teacher), views/s, under cProfile (one thread: no prefetch), top functions by own time;
  2. ``apply_batch`` on one batch of 256 views under ``torch.profiler``: top operators by device time
     and by CPU time.
Writes DIR/profile.txt.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench.gpu_check as gc  # noqa: E402
from pipeline import teacher as teacher_stage  # noqa: E402
from seed.augment import apply_batch  # noqa: E402
from seed.views import Recipe, draw_views  # noqa: E402
from seed.decode import Decoder  # noqa: E402
from seed.shards import iter_shard  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu-profile-out")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--data", default=str(ROOT / ".whl" / "fmnist-2048.npz"))
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    S = gc.SMOKE if args.smoke else gc.Sizes()
    st = gc.Check(Path(args.out), device, S, 1e9, None)
    out = io.StringIO()

    def say(text: str) -> None:
        print(text, flush=True)
        out.write(text + "\n")

    gc.sec_shards(st, {}, Path(args.data))
    cfg = gc.make_config(st, "resnet50", 224, st.n_shards)
    plan = teacher_stage.make_plan(cfg, gc.make_storage(st.root))
    shards = list(range(len(plan.urls)))

    def data_path() -> int:
        n = 0
        for item in teacher_stage._shard_items(cfg, plan, shards, S.teacher_batch, device):
            if isinstance(item, teacher_stage._Views):
                n += len(item.rows)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n

    data_path()  # warm-up (CUDA context, nvJPEG handles, kernels)
    t = time.perf_counter()
    views = data_path()
    say(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}); data path alone: "
        f"{views} views in {time.perf_counter() - t:.2f} s = {views / (time.perf_counter() - t):.0f} views/s")
    prof = cProfile.Profile()
    prof.enable()
    data_path()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    say(s.getvalue())

    samples = [x for _, x in zip(range(S.teacher_batch // 2), iter_shard(plan.urls[0]))]
    images = [im for im in Decoder(device).decode(samples) if isinstance(im, torch.Tensor)]
    rows = [draw_views(Recipe(), seed=0, key=s.key, views=2, height=int(im.shape[-2]), width=int(im.shape[-1]))
            for s, im in zip(samples, images)]
    params = torch.from_numpy(np.concatenate(rows)).to(device)
    views_in = [im for im in images for _ in range(2)]
    apply_batch(views_in, params, Recipe(), 224)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as p:
        apply_batch(views_in, params, Recipe(), 224)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    say(f"apply_batch, {len(views_in)} views of {len({tuple(im.shape) for im in images})} source sizes:")
    say(p.key_averages().table(sort_by=key, row_limit=20))
    say(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "profile.txt").write_text(out.getvalue())


if __name__ == "__main__":
    main()
