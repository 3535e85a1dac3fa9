"""The CUDA path's augmentation as Triton kernels: five launches per batch of views.

``seed.augment``'s tensor code augments a batch on a GPU with a few hundred to a thousand torch calls: four per
image to paste it into a shared canvas, a sampling call per view rank, and the jitter as torch operations over
the groups of views that take each operation in each position, a few dozen passes over the pixels (on an H100
the jitter's kernels took 5.4 ms per 256 views at 224 px, a quarter of a bf16 ResNet-50 forward;
docs/benchmarks.md). Every call is issued by the data thread, which set the teacher stage's pace on a GPU. Here:

1. ``_crops``: every view's box sampled straight from its image (the images laid end to end in one buffer), as
   ``grid_sample``'s bilinear with border clamping does on the CPU path's per-size call, flipped where asked;
2. ``_luma_sums``: each view's pixels through the jitter's operations drawn before its contrast, summed as luma
   per block of pixels (a view applies each operation once, so its one contrast needs one mean);
3. ``_jitter``: each view's pixels through its four operations in its drawn order, the contrast with that
   mean, then grayscale, written back in place;
4. ``_blur_rows`` and ``_blur_columns``: the separable Gaussian blur with each view's taps and reflect padding
   (through a buffer between the passes), then solarisation, in place.

The formulas are ``seed.augment``'s, written per pixel: the views equal the tensor path's up to float rounding
(coordinates not normalised to a canvas, the mean and the blur's taps summed in another order, and on the GPU
fused multiply-adds and CUDA's division). ``tests/integration/test_augment_kernels.py`` checks them against it under Triton's
interpreter on the CPU, and compiles them for two GPU architectures.

``crops`` returns None and ``jitter`` and ``blur`` False, after one warning naming why, where Triton is missing
or the kernels do not compile; ``seed.augment`` then runs the tensor path.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

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
# the blur's programs: K taps x 3 channels in registers spilled at 1,024 pixels and 13 taps on sm_90 (ptxas)
BLUR_BLOCK = 256
# the crop columns of a view row, as boxes [B, 5]: crop_x0, crop_y0, crop_w, crop_h (fractions of the image), flip
BOX = 5

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
    def _sample(plane, w, xa, xb, ya, yb, wx, ex, wy, ey, inside):
        """Bilinear value of one uint8 plane in [0, 1]: the four neighbours' weights as the CPU's grid_sample."""
        nw = tl.load(plane + ya * w + xa, mask=inside, other=0).to(tl.float32) / 255.0
        ne = tl.load(plane + ya * w + xb, mask=inside, other=0).to(tl.float32) / 255.0
        sw = tl.load(plane + yb * w + xa, mask=inside, other=0).to(tl.float32) / 255.0
        se = tl.load(plane + yb * w + xb, mask=inside, other=0).to(tl.float32) / 255.0
        return nw * (ey * ex) + ne * (ey * wx) + sw * (wy * ex) + se * (wy * wx)

    @triton.jit
    def _crops(src_ptr, starts_ptr, sizes_ptr, image_of_ptr, boxes_ptr, out_ptr, OH, OW, BLOCK: tl.constexpr):
        """Program (view, block of output pixels): the view's box of its image, resized to OH x OW, flipped."""
        view, blk = tl.program_id(0), tl.program_id(1)
        image = tl.load(image_of_ptr + view)
        start = tl.load(starts_ptr + image)                                   # int64: where the image begins
        h, w = tl.load(sizes_ptr + image * 2), tl.load(sizes_ptr + image * 2 + 1)
        hf, wf = h.to(tl.float32), w.to(tl.float32)
        x0, y0 = tl.load(boxes_ptr + view * 5) * wf, tl.load(boxes_ptr + view * 5 + 1) * hf
        bw, bh = tl.load(boxes_ptr + view * 5 + 2) * wf, tl.load(boxes_ptr + view * 5 + 3) * hf
        flip = tl.load(boxes_ptr + view * 5 + 4) > 0.5
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        inside = offs < OH * OW
        i, j = offs // OW, offs % OW
        u = (j.to(tl.float32) + 0.5) / OW                                     # output pixel centres in (0, 1)
        v = (i.to(tl.float32) + 0.5) / OH
        u = tl.where(flip, 1.0 - u, u)
        xs = tl.minimum(tl.maximum(x0 + u * bw, x0 + 0.5), x0 + bw - 0.5)     # source pixel coordinates, in the box
        ys = tl.minimum(tl.maximum(y0 + v * bh, y0 + 0.5), y0 + bh - 0.5)
        # grid_sample (align_corners=False): normalised to the image and back, then clamped to its border
        ix = tl.minimum(tl.maximum(((2.0 * xs / wf - 1.0 + 1.0) * wf - 1.0) / 2.0, 0.0), wf - 1.0)
        iy = tl.minimum(tl.maximum(((2.0 * ys / hf - 1.0 + 1.0) * hf - 1.0) / 2.0, 0.0), hf - 1.0)
        fx, fy = tl.floor(ix), tl.floor(iy)
        wx, wy = ix - fx, iy - fy
        ex, ey = 1.0 - wx, 1.0 - wy
        xa, ya = fx.to(tl.int64), fy.to(tl.int64)
        xb, yb = tl.minimum(xa + 1, w - 1), tl.minimum(ya + 1, h - 1)         # (weight 0 where clamped)
        plane = src_ptr + start
        at = out_ptr + view.to(tl.int64) * 3 * OH * OW + offs
        hw = h * w                                                            # (sizes and starts are int64)
        tl.store(at, _sample(plane, w, xa, xb, ya, yb, wx, ex, wy, ey, inside), mask=inside)
        tl.store(at + OH * OW, _sample(plane + hw, w, xa, xb, ya, yb, wx, ex, wy, ey, inside), mask=inside)
        tl.store(at + 2 * OH * OW, _sample(plane + 2 * hw, w, xa, xb, ya, yb, wx, ex, wy, ey, inside), mask=inside)

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


    @triton.jit
    def _reflect(i, n):
        """Index ``i`` in [-n + 1, 2n - 2] reflected into [0, n - 1], as ``F.pad(mode="reflect")``."""
        i = tl.where(i < 0, -i, i)
        return tl.where(i >= n, 2 * n - 2 - i, i)

    @triton.jit
    def _blur_rows(x_ptr, weights_ptr, tmp_ptr, H, W, K: tl.constexpr, BLOCK: tl.constexpr):
        """Program (view, block): the horizontal pass of a view's blur (weights ``[K]`` a view; a view whose first
        weight is negative has no blur), into ``tmp``."""
        view, blk = tl.program_id(0), tl.program_id(1)
        if tl.load(weights_ptr + view * K) >= 0.0:
            offs = blk * BLOCK + tl.arange(0, BLOCK)
            inside = offs < H * W
            i, j = offs // W, offs % W
            base = view.to(tl.int64) * 3 * H * W
            for c in tl.static_range(3):
                acc = tl.zeros((BLOCK,), dtype=tl.float32)
                for t in tl.static_range(K):
                    src = i * W + _reflect(j + t - K // 2, W)
                    acc += tl.load(weights_ptr + view * K + t) * tl.load(x_ptr + base + c * H * W + src, mask=inside,
                                                                         other=0.0)
                tl.store(tmp_ptr + base + c * H * W + offs, acc, mask=inside)

    @triton.jit
    def _blur_columns(x_ptr, weights_ptr, tmp_ptr, solarize_ptr, threshold, H, W, K: tl.constexpr,
                      BLOCK: tl.constexpr):
        """Program (view, block): the vertical pass of a view's blur from ``tmp`` into ``x``, then its
        solarisation (``solarize``: 0/1 a view); a view with neither is left as it is."""
        view, blk = tl.program_id(0), tl.program_id(1)
        blur = tl.load(weights_ptr + view * K) >= 0.0
        solarize = tl.load(solarize_ptr + view) != 0
        if blur | solarize:
            offs = blk * BLOCK + tl.arange(0, BLOCK)
            inside = offs < H * W
            i, j = offs // W, offs % W
            base = view.to(tl.int64) * 3 * H * W
            for c in tl.static_range(3):
                if blur:
                    v = tl.zeros((BLOCK,), dtype=tl.float32)
                    for t in tl.static_range(K):
                        src = _reflect(i + t - K // 2, H) * W + j
                        v += tl.load(weights_ptr + view * K + t) * tl.load(tmp_ptr + base + c * H * W + src,
                                                                           mask=inside, other=0.0)
                else:
                    v = tl.load(x_ptr + base + c * H * W + offs, mask=inside, other=0.0)
                if solarize:
                    v = tl.where(v >= threshold, 1.0 - v, v)
                tl.store(x_ptr + base + c * H * W + offs, v, mask=inside)


_failed: str | None = None
_lock = threading.Lock()


def crops(images: list[torch.Tensor], image_of: list[int], boxes: torch.Tensor, out: tuple[int, int],
          into: torch.Tensor) -> bool:
    """Views float32 in [0, 1] written to ``into`` (contiguous ``[B, 3, *out]``): view ``b``'s box of
    ``images[image_of[b]]`` (uint8 ``[3, h, w]`` on the GPU), from ``boxes [B, 5]`` float32 on the same device
    (each view's crop_x0, crop_y0, crop_w, crop_h and flip). False (nothing done) where the kernels cannot run
    here."""
    if _MISSING or _failed:
        return False
    if not images:
        raise ValueError("augment kernels: no images")
    device = images[0].device
    if any(im.dtype != torch.uint8 or im.dim() != 3 or im.shape[0] != 3 or im.device != device for im in images):
        raise ValueError("augment kernels: the images must be uint8 [3, h, w] tensors on one device")
    B, (oh, ow) = len(image_of), out
    if tuple(boxes.shape) != (B, BOX):
        raise ValueError(f"augment kernels: boxes must be [{B}, {BOX}], got {list(boxes.shape)}")
    if tuple(into.shape) != (B, 3, oh, ow) or into.dtype != torch.float32 or not into.is_contiguous():
        raise ValueError(f"augment kernels: the views go to a contiguous float32 [{B}, 3, {oh}, {ow}] tensor")
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    starts = [0]
    for h, w in sizes[:-1]:
        starts.append(starts[-1] + 3 * h * w)
    from seed.augment import _to_device  # (seed.augment imports this module only when asked for)

    # one copy to the GPU: the images' starts, sizes and each view's image
    table = _to_device(torch.tensor(starts + [v for hw in sizes for v in hw] + list(image_of), dtype=torch.int64),
                       device)
    n = len(images)
    flat = torch.cat([im.reshape(-1) for im in images])                      # the images end to end
    return _launch(device, lambda: _crops[(B, triton.cdiv(oh * ow, BLOCK))](
        flat, table[:n], table[n: 3 * n], table[3 * n:], boxes.contiguous(), into, oh, ow, BLOCK=BLOCK))


def jitter(x: torch.Tensor, factors: torch.Tensor, codes: torch.Tensor, contrast: bool = True) -> bool:
    """The jitter and grayscale of ``x`` (contiguous float32 ``[B, 3, H, W]`` in [0, 1]), in place.

    ``factors``: float32 ``[B, 4]`` (brightness, contrast, saturation, hue); ``codes``: int32 ``[B, 6]`` (see
    ``CODES``), both on ``x``'s device; ``contrast``: whether any view has one (without, no luma sums are
    needed). False (nothing done) where the kernels cannot run here.
    """
    if _MISSING or _failed:
        return False
    _check_views(x)
    B, _, H, W = x.shape
    if tuple(factors.shape) != (B, 4) or tuple(codes.shape) != (B, CODES):
        raise ValueError(f"augment kernels: factors must be [{B}, 4] and codes [{B}, {CODES}], got "
                         f"{list(factors.shape)} and {list(codes.shape)}")
    if B == 0:
        return True
    N = H * W
    grid = (B, triton.cdiv(N, BLOCK))                                        # (a grid's first axis has no 65,535 cap)
    factors, codes = factors.float().contiguous(), codes.to(torch.int32).contiguous()
    sums = torch.zeros(B, grid[1] if contrast else 1, dtype=torch.float32, device=x.device)

    def launch() -> None:
        if contrast:
            _luma_sums[grid](x, factors, codes, sums, N, BLOCK=BLOCK)
        _jitter[grid](x, factors, codes, sums.sum(dim=1).div_(N) if contrast else sums[:, 0], N, BLOCK=BLOCK)

    return _launch(x.device, launch)


def blur(x: torch.Tensor, weights: torch.Tensor, solarize: torch.Tensor, threshold: float) -> bool:
    """The separable Gaussian blur (reflect padding) and solarisation of ``x`` (contiguous float32
    ``[B, 3, H, W]``), in place. ``weights``: float32 ``[B, K]``, each view's normalised taps (K odd, K // 2 < H
    and W; -1 in a view's first tap: no blur); ``solarize``: int32 ``[B]``, 1 where the view is solarised at
    ``threshold``; both on ``x``'s device. False (nothing done) where the kernels cannot run here."""
    if _MISSING or _failed:
        return False
    _check_views(x)
    B, _, H, W = x.shape
    K = int(weights.shape[1])
    if tuple(weights.shape) != (B, K) or tuple(solarize.shape) != (B,) or K % 2 == 0 or K // 2 >= min(H, W):
        raise ValueError(f"augment kernels: weights must be [{B}, K] with K odd and K // 2 < {min(H, W)}, and "
                         f"solarize [{B}]; got {list(weights.shape)} and {list(solarize.shape)}")
    if B == 0:
        return True
    grid = (B, triton.cdiv(H * W, BLUR_BLOCK))
    weights, solarize = weights.float().contiguous(), solarize.to(torch.int32).contiguous()
    tmp = torch.empty_like(x)

    def launch() -> None:
        _blur_rows[grid](x, weights, tmp, H, W, K=K, BLOCK=BLUR_BLOCK)
        _blur_columns[grid](x, weights, tmp, solarize, float(threshold), H, W, K=K, BLOCK=BLUR_BLOCK)

    return _launch(x.device, launch)


def _check_views(x: torch.Tensor) -> None:
    if x.dtype != torch.float32 or not x.is_contiguous() or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"augment kernels: x must be a contiguous float32 [B, 3, H, W] tensor, got {x.dtype} "
                         f"{list(x.shape)}")


def _launch(device: torch.device, launch: Callable[[], None]) -> bool:
    """``launch()`` on ``device`` (Triton launches on the current one); False, with one warning for the process,
    where it fails: no C compiler for Triton's launcher, an unsupported GPU, ... (the first call compiles). Out of
    GPU memory is raised as it is: it says nothing about the kernels."""
    global _failed
    with _lock:                                                               # one compilation at a time
        if _failed:
            return False
        try:
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                launch()
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            _failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            log.warning("fused_augment: the augmentation kernels do not run on %s (%s); the views are made by torch "
                        "operations", device, _failed)
            return False
    return True


def unavailable() -> str | None:
    """Why ``run`` would do nothing here (None: it has not failed, and Triton is installed)."""
    return _MISSING or _failed
