"""The sequential colour jitter and grayscale of a batch of views as two Triton kernels (CUDA).

``seed.augment``'s tensor code runs MoCo-v2's jitter as torch operations over groups of views: on a GPU a few
dozen passes over the batch's pixels and a few hundred kernel launches per batch (on an H100 its kernels took
5.4 ms per 256 views at 224 px, a quarter of a bf16 ResNet-50 forward; docs/benchmarks.md). Here every pixel's
whole chain runs in registers:

1. ``_luma_sums``: each view's pixels through the operations drawn before its contrast, summed as luma per
   block of pixels (a view applies each operation once, so its one contrast needs one mean);
2. ``_jitter``: each view's pixels through its four operations in its drawn order, the contrast with that
   mean, then grayscale, written back in place.

Two reads and one write of the pixels, two launches. The formulas are ``seed.augment``'s, written per pixel;
the views equal the tensor path's up to float rounding (the mean is summed in another order, and the GPU may
fuse a multiply and an add): ``tests/integration/test_colour_kernels.py`` checks them against it under Triton's
interpreter on the CPU.

``run`` returns False, after one warning naming why, where Triton is missing or the kernels do not compile;
``seed.augment`` then runs the tensor path.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # torch's CPU wheels come without Triton
    triton = None
    _MISSING: str | None = f"Triton is not installed ({exc})"
else:
    _MISSING = None

BLOCK = 1024  # pixels per program

# Operation codes, the recipe's: 0 brightness, 1 contrast, 2 saturation, 3 hue (-1: the view has no jitter).
# codes [B, 6] int32: the operation at each position, the position of the contrast (4: none), grayscale (0/1).
CODES = 6

if triton is not None:

    @triton.jit
    def _clamp(v):
        return tl.minimum(tl.maximum(v, 0.0), 1.0)

    @triton.jit
    def _luma(r, g, b):
        return 0.2989 * r + 0.587 * g + 0.114 * b                            # ITU-R 601-2, as seed.augment

    @triton.jit
    def _apply(op, r, g, b, f_bright, f_contrast, f_sat, f_hue, mean):
        """One operation (``op``, the same for the whole program) on a block of pixels ``r, g, b``."""
        if op == 0:                                                           # brightness: blend with black
            r, g, b = _clamp(f_bright * r), _clamp(f_bright * g), _clamp(f_bright * b)
        elif op == 1:                                                         # contrast: with the mean luma
            r = _clamp(f_contrast * r + (1.0 - f_contrast) * mean)
            g = _clamp(f_contrast * g + (1.0 - f_contrast) * mean)
            b = _clamp(f_contrast * b + (1.0 - f_contrast) * mean)
        elif op == 2:                                                         # saturation: with the luma
            luma = _luma(r, g, b)
            r = _clamp(f_sat * r + (1.0 - f_sat) * luma)
            g = _clamp(f_sat * g + (1.0 - f_sat) * luma)
            b = _clamp(f_sat * b + (1.0 - f_sat) * luma)
        elif op == 3:                                                         # hue: through HSV, closed form
            maxc = tl.maximum(tl.maximum(r, g), b)
            cr = maxc - tl.minimum(tl.minimum(r, g), b)
            inv = 1.0 / tl.where(cr == 0.0, 1.0, cr)
            h = tl.where(maxc == r, (g - b) * inv, tl.where(maxc == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
            h = h / 6.0 + 1.0                                                 # in (0.8, 1.9): fmod 1 is h - floor h
            h = h - tl.floor(h)
            h = h + f_hue
            h6 = (h - tl.floor(h)) * 6.0                                      # torch.remainder(h + shift, 1) * 6
            k = 5.0 + h6
            k = tl.where(k >= 6.0, k - 6.0, k)
            r = _clamp(maxc - cr * _clamp(tl.minimum(k, 4.0 - k)))
            k = 3.0 + h6
            k = tl.where(k >= 6.0, k - 6.0, k)
            g = _clamp(maxc - cr * _clamp(tl.minimum(k, 4.0 - k)))
            k = 1.0 + h6
            k = tl.where(k >= 6.0, k - 6.0, k)
            b = _clamp(maxc - cr * _clamp(tl.minimum(k, 4.0 - k)))
        return r, g, b

    @triton.jit
    def _block(x_ptr, view, blk, N, BLOCK: tl.constexpr):
        """Block ``blk`` of view ``view``'s pixels: their addresses in the red plane, which are in the image, r, g, b."""
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        inside = offs < N
        at = x_ptr + view.to(tl.int64) * 3 * N + offs
        return (at, inside, tl.load(at, mask=inside, other=0.0), tl.load(at + N, mask=inside, other=0.0),
                tl.load(at + 2 * N, mask=inside, other=0.0))

    @triton.jit
    def _luma_sums(x_ptr, factors_ptr, codes_ptr, sums_ptr, N, BLOCK: tl.constexpr):
        """Program (view, block): the block's luma after the view's operations before its contrast."""
        view, blk = tl.program_id(0), tl.program_id(1)
        contrast_at = tl.load(codes_ptr + view * 6 + 4)
        if contrast_at < 4:                                                   # (a view with none keeps its 0)
            _, inside, r, g, b = _block(x_ptr, view, blk, N, BLOCK)
            f_bright = tl.load(factors_ptr + view * 4)
            f_sat, f_hue = tl.load(factors_ptr + view * 4 + 2), tl.load(factors_ptr + view * 4 + 3)
            for position in tl.static_range(3):
                if position < contrast_at:
                    r, g, b = _apply(tl.load(codes_ptr + view * 6 + position), r, g, b, f_bright, 1.0, f_sat, f_hue,
                                     0.0)
            tl.store(sums_ptr + view * tl.num_programs(1) + blk, tl.sum(tl.where(inside, _luma(r, g, b), 0.0), axis=0))

    @triton.jit
    def _jitter(x_ptr, factors_ptr, codes_ptr, mean_ptr, N, BLOCK: tl.constexpr):
        """Program (view, block): the view's four operations in its order, then grayscale, in place."""
        view, blk = tl.program_id(0), tl.program_id(1)
        at, inside, r, g, b = _block(x_ptr, view, blk, N, BLOCK)
        f_bright, f_contrast = tl.load(factors_ptr + view * 4), tl.load(factors_ptr + view * 4 + 1)
        f_sat, f_hue = tl.load(factors_ptr + view * 4 + 2), tl.load(factors_ptr + view * 4 + 3)
        mean = tl.load(mean_ptr + view)
        for position in tl.static_range(4):
            r, g, b = _apply(tl.load(codes_ptr + view * 6 + position), r, g, b, f_bright, f_contrast, f_sat, f_hue,
                             mean)
        if tl.load(codes_ptr + view * 6 + 5) != 0:                            # grayscale
            r = _luma(r, g, b)
            g, b = r, r
        tl.store(at, r, mask=inside)
        tl.store(at + N, g, mask=inside)
        tl.store(at + 2 * N, b, mask=inside)


_failed: str | None = None
_lock = threading.Lock()


def run(x: torch.Tensor, factors: torch.Tensor, codes: torch.Tensor) -> bool:
    """The jitter and grayscale of ``x`` (contiguous float32 ``[B, 3, H, W]`` in [0, 1]), in place.

    ``factors``: float32 ``[B, 4]`` (brightness, contrast, saturation, hue); ``codes``: int32 ``[B, 6]`` (see
    ``CODES``), both on ``x``'s device. False (nothing done) where the kernels cannot run here.
    """
    global _failed
    if _MISSING or _failed:
        return False
    if x.dtype != torch.float32 or not x.is_contiguous() or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"colour kernels: x must be a contiguous float32 [B, 3, H, W] tensor, got {x.dtype} "
                         f"{list(x.shape)}")
    B, _, H, W = x.shape
    if B == 0:
        return True
    N = H * W
    grid = (B, triton.cdiv(N, BLOCK))                                        # (a grid's first axis has no 65,535 cap)
    factors, codes = factors.float().contiguous(), codes.to(torch.int32).contiguous()
    device = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    try:
        # the first call compiles, one compilation at a time; Triton launches on the current device
        with _lock, device:
            sums = torch.zeros(B, grid[1], dtype=torch.float32, device=x.device)
            _luma_sums[grid](x, factors, codes, sums, N, BLOCK=BLOCK)
            mean = sums.sum(dim=1).div_(N)
            _jitter[grid](x, factors, codes, mean, N, BLOCK=BLOCK)
    except Exception as exc:  # no C compiler for Triton's launcher, an unsupported GPU, ...: the tensor path
        _failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        log.warning("fused_colour: the colour kernels do not run on %s (%s); the jitter runs as torch operations",
                    x.device, _failed)
        return False
    return True


def unavailable() -> str | None:
    """Why ``run`` would do nothing here (None: it has not failed, and Triton is installed)."""
    return _MISSING or _failed
