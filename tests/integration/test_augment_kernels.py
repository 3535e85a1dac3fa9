"""The augmentation kernels (``seed.augment_kernels``, CUDA) against the tensor path, under Triton's interpreter on
the CPU; the tensor path where they cannot run; and the kernels compiled for GPUs. The first two each in a
process of its own: the interpreter is chosen when Triton is imported."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import json, sys, logging
import numpy as np, torch
from torch.utils._python_dispatch import TorchDispatchMode
from seed import augment, augment_kernels
from seed.views import COL, Recipe, draw_params
logging.basicConfig(level=logging.WARNING)
g = torch.Generator().manual_seed(5)
sizes = [(60 + 7 * (i % 5), 50 + 3 * (i % 7)) for i in range(72)]
images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
images[:8] = [im[:1].expand(3, -1, -1).contiguous() for im in images[:8]]       # grey sources too
recipe = Recipe()
host = torch.from_numpy(np.stack([draw_params(recipe, seed=9, key=f"k{i}", view=i % 4, height=h, width=w)
                                  for i, (h, w) in enumerate(sizes)]))
# hue shifts at and next to the ends of their range, and next to 0 (the recipe draws at most 0.1)
host[8:16, COL["jitter"]] = 1.0
host[8:16, COL["hue"]] = torch.tensor([0.5, -0.5, 0.49999997, -0.49999997, 1e-8, -1e-8, 0.25, -0.25], dtype=host.dtype)
out = (40, 40)                                                                   # 1,600 px: two blocks, the last partial
crops = augment._crops_by_size(images, host, out)


def tensor_jitter(x, rows):
    x = augment._color_jitter(x, rows, rows)
    gray = augment._rows(rows[:, COL["grayscale"]] > 0.5, x.device)
    if gray is not None:
        x.index_copy_(0, gray, augment._grayscale(x.index_select(0, gray)).expand(-1, 3, -1, -1))
    return x


tensor_path = tensor_jitter(crops.clone(), host)
fused = crops.clone()
jitter_ran = augment._kernel_jitter(fused, host)
codes = augment.jitter_codes(host)
no_contrast = codes[:, 4] == 4
same = [bool(torch.equal(a, b)) for a, b in zip(fused, tensor_path)]
no_jitter = host.clone()                                                         # grayscale only: no luma sums
no_jitter[:, COL["jitter"]] = 0.0
grey_only = crops.clone()
augment._kernel_jitter(grey_only, no_jitter)
grey_only_same = bool(torch.equal(grey_only, tensor_jitter(crops.clone(), no_jitter)))
# the whole colour stage on 12 views of 36 x 44 px (rows and columns not to be swapped): jitter, then a strong
# blur (19 taps) and solarisation of every third view (the interpreter takes its time over 19 taps)
strong, wide = Recipe(blur_reference_size=32), (36, 44)
stage_rows = host[8:20].clone()
stage_rows[::3, COL["solarize"]] = 1.0
wide_crops = augment._crops_by_size(images[8:20], host[8:20], wide)
whole_tensor = augment._colour_and_blur(wide_crops.clone(), stage_rows, stage_rows, strong, wide)
whole_fused = augment._colour_and_blur(wide_crops.clone(), stage_rows, stage_rows, strong, wide, fused=True)
blur_only = augment._colour_and_blur(wide_crops.clone(), no_jitter[8:20], no_jitter[8:20], strong, wide, fused=True)
blur_only_tensor = augment._colour_and_blur(wide_crops.clone(), no_jitter[8:20], no_jitter[8:20], strong, wide)
# crops: 3 views of each of 24 images (the same tensors), a rectangular output
per_view = [im for im in images[:24] for _ in range(3)]
rows = torch.from_numpy(np.stack([draw_params(recipe, seed=3, key=f"k{i // 3}", view=i % 3, height=int(im.shape[1]),
                                              width=int(im.shape[2])) for i, im in enumerate(per_view)]))
kernel_crops = augment._kernel_crops(per_view, rows, (36, 44), torch.device("cpu"))
# the same views launched one image at a time (a launch holds at least one image, whatever its bytes)


class Copies(TorchDispatchMode):  # each launch copies its images end to end: one cat
    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        Copies.n += func is torch.ops.aten.cat.default
        return func(*args, **(kwargs or {}))


with Copies():
    split_crops = augment._kernel_crops(per_view, rows, (36, 44), torch.device("cpu"), copy_bytes=1)
per_size = augment._crops_by_size(per_view, rows, (36, 44))
canvas = augment._crops_on_canvas(per_view, rows, (36, 44))
json.dump({"jitter_ran": jitter_ran, "crops_ran": kernel_crops is not None, "grey_only_same": grey_only_same,
           "taps": augment.blur_kernel_size(strong, wide), "blurred": int((stage_rows[:, COL["blur_sigma"]] > 0).sum()),
           "whole_diff": (whole_fused - whole_tensor).abs().max().item(),
           "blur_only_diff": (blur_only - blur_only_tensor).abs().max().item(), "flips": int((rows[:, COL["flip"]] > 0.5).sum()),
           "split_launches": Copies.n, "split_same": None if split_crops is None else bool(torch.equal(split_crops, kernel_crops)),
           "crops_vs_per_size": None if kernel_crops is None else (kernel_crops - per_size).abs().max().item(),
           "canvas_vs_per_size": (canvas - per_size).abs().max().item(),
           "unavailable": augment_kernels.unavailable(), "max_diff": (fused - tensor_path).abs().max().item(),
           "contrast_at": torch.bincount(codes[:, 4].long(), minlength=5).tolist(),
           "grey_views": int(codes[:, 5].sum()), "jitter_off": int((codes[:, 0] < 0).sum()),
           "same_without_contrast": all(s for s, n in zip(same, no_contrast) if n), "same": sum(same)}, sys.stdout)
"""


def _probe(interpret: bool) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout), done.stderr


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="needs Triton (installed with torch's CUDA wheels): its interpreter runs the kernels")
def test_the_kernels_give_the_tensor_paths_views() -> None:
    """Every order of the four operations, the contrast at each position and none, views without jitter, grey
    views and grey sources, hue shifts of +-0.5 and next to it: the kernels' views are the tensor path's, to the
    bit where the view has no contrast (whose mean they sum in another order)."""
    result, _ = _probe(interpret=True)
    assert result["unavailable"] is None and result["jitter_ran"]             # the kernels ran
    assert min(result["contrast_at"]) > 0 and result["grey_views"] > 0 and result["jitter_off"] > 0, result
    assert result["max_diff"] <= 2e-6, result
    assert result["same_without_contrast"] and result["grey_only_same"], result
    # blur (a strong one, reflecting at the edges, on views wider than tall) and solarisation: the taps summed in
    # another order than the convolution's
    assert result["taps"] == 19 and 2 < result["blurred"] < 10, result
    assert result["blur_only_diff"] <= 1e-6 and result["whole_diff"] <= 5e-6, result
    # the crops: each view sampled from its own image, as the CPU path's per-size call up to float rounding, and
    # no further from it than the canvas path is
    assert result["crops_ran"] and 0 < result["flips"] < 72, result
    # launched one image at a time (24 launches), every view to the bit
    assert result["split_same"] and result["split_launches"] == 24, result
    assert result["crops_vs_per_size"] <= max(1e-5, result["canvas_vs_per_size"]), result


def test_without_the_kernels_the_views_are_the_tensor_paths() -> None:
    """On the CPU with Triton compiling for a GPU, the kernels cannot run: one warning naming the setting, and the
    colour stage gives the tensor path's views to the bit."""
    result, stderr = _probe(interpret=False)
    assert result["unavailable"] and not result["crops_ran"] and not result["jitter_ran"], result
    assert result["whole_diff"] == 0.0 and result["blur_only_diff"] == 0.0, result
    assert "fused_augment" in stderr and "the views are made by torch operations" in stderr, stderr[-2000:]
    assert stderr.count("fused_augment") == 1, stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (installed with torch's CUDA wheels)")
@pytest.mark.parametrize("arch", [80, 90], ids=["A100", "H100"])
def test_the_kernels_compile_for_data_centre_gpus(arch: int) -> None:
    """The interpreter runs what the compiler may refuse (a branch giving a value two types, an operation the
    GPU lacks): every kernel compiles to a GPU binary here, without a GPU, as Triton does on the first call."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from seed import augment_kernels

    types = {"src_ptr": "*u8", "starts_ptr": "*i64", "sizes_ptr": "*i64", "image_of_ptr": "*i64", "codes_ptr": "*i32",
             "solarize_ptr": "*i32", "threshold": "fp32", "N": "i32", "OH": "i32", "OW": "i32", "H": "i32", "W": "i32",
             "BLOCK": "constexpr", "K": "constexpr"}
    for kernel in (augment_kernels._crops, augment_kernels._luma_sums, augment_kernels._jitter,
                   augment_kernels._blur_rows, augment_kernels._blur_columns):
        signature = {name: types.get(name, "*fp32") for name in kernel.arg_names}
        constants = {name: value for name, value in (("BLOCK", augment_kernels.BLOCK), ("K", 17))
                     if name in kernel.arg_names}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", arch, 32))
        assert compiled.asm["cubin"] and compiled.metadata.name == kernel.__name__
