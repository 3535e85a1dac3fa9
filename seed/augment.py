"""Replayable MoCo-v2 augmentation applied: a batch of images and their view rows -> the views.

The rows come from ``seed.views`` (drawn once, stored in the cache, replayed by every student), so the
student sees exactly the view whose teacher embedding it is matched to (Beyer et al., CVPR 2022: a
teacher fixed to one view per image makes students overfit; see docs/design.md).

Applying works on a whole batch in one call: the crop, resize and flip become one sampling grid
per image (``grid_sample``), the colour operations are tensor arithmetic over the batch. This is
one ``grid_sample`` call per batch instead of a Python call chain per image.
Differences from the PIL pipeline, on purpose: colour operations run on float tensors in [0, 1]
(no uint8 rounding between them) and the resize is bilinear without antialiasing (torchvision's
``antialias=False``), where PIL's shrinking resize filters: a crop shrunk by a large factor (a
multi-megapixel source) aliases, and ImageNet-sized views differ from PIL's by about 2 grey levels
(median; docs/design.md, Augmentation). Nothing pre-shrinks the sources.

Example:
    >>> import torch
    >>> from seed.views import Recipe, draw_params
    >>> recipe = Recipe()
    >>> row = draw_params(recipe, seed=0, key="img_0001", view=2, height=28, width=28)
    >>> image = torch.zeros(3, 28, 28, dtype=torch.uint8)
    >>> apply_batch([image], torch.from_numpy(row[None]), recipe, size=32).shape
    torch.Size([1, 3, 32, 32])
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from seed.views import COL, COLUMNS, P, Recipe, blur_sigma_px

_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


def _as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` of an output size given as one side or two (Python, numpy or torch integers), both >= 1."""
    try:
        hw = (operator.index(size),) * 2 if not isinstance(size, (tuple, list)) else tuple(map(operator.index, size))
    except TypeError:
        hw = ()
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"apply_batch: size must be a side or (height, width) of integers >= 1, got {size!r}")
    return hw[0], hw[1]


def _check_images(images: Sequence[torch.Tensor] | torch.Tensor) -> None:
    """Every image is uint8 ``[3, h, w]`` (a float image would be scaled by 1/255 once more on the CPU and cut to
    integers on the GPU: views near black, different on each device)."""
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"apply_batch: images must be uint8 [B, 3, h, w], got {images.dtype} "
                             f"{list(images.shape)}")
        return
    for i, im in enumerate(images):
        if im.dtype != torch.uint8 or im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"apply_batch: image {i} must be uint8 [3, h, w], got {im.dtype} {list(im.shape)}")


def apply_batch(
    images: Sequence[torch.Tensor] | torch.Tensor,
    params: torch.Tensor,
    recipe: Recipe,
    size: int | tuple[int, int],
    device: torch.device | str | None = None,
    out: torch.Tensor | None = None,
    fused_augment: bool = False,
) -> torch.Tensor:
    """Apply view rows ``params [B, P]`` to ``B`` uint8 ``[3, h, w]`` images -> float ``[B, 3, *size]`` in [0, 1].

    ``images`` may be a list (any sizes) or a uint8 tensor ``[B, 3, h, w]``. Runs on ``device`` (default:
    the device of ``params``); the same inputs give bit-identical outputs on CPU. ``out``: on the CPU, a
    contiguous float32 tensor of that shape to write the views into (a worker's shared buffer).

    Pass ``params`` on the CPU with ``device="cuda"``: which views take which branch of the recipe
    (jitter and its order, grayscale, blur, solarisation) is then read from the host rows, so the
    batch's kernels are queued without once waiting for the GPU. (Rows already on the GPU cost one
    copy back, a single wait.)

    ``fused_augment``: on CUDA, the crops, the sequential jitter and grayscale, the blur and the solarisation as
    five Triton kernels over the batch (``seed.augment_kernels``) instead of hundreds of torch calls: the same
    views up to float rounding; the torch operations where the kernels cannot run. Ignored on the CPU, whose
    views stay bit-exact.
    """
    if len(images) != params.shape[0]:
        raise ValueError(f"apply_batch: {len(images)} images but {params.shape[0]} parameter rows")
    if params.shape[-1] != P:
        raise ValueError(f"apply_batch: parameter rows have {params.shape[-1]} columns, expected {P} ({COLUMNS})")
    _check_images(images)
    size_hw = _as_size(size)
    target = params.device if device is None else torch.device(device)
    host = params.cpu()                                                       # a no-op for rows on the CPU
    if target.type == "cuda":
        if out is not None:
            raise ValueError("apply_batch: out is for the CPU only")
        rows = _to_device(host, target)
        x = _kernel_crops(images, host, size_hw, target) if fused_augment else None
        if x is None:
            x = _crops_on_canvas(images, rows, size_hw)
        return _colour_and_blur(x, rows, host, recipe, size_hw, fused_augment)
    shape = (len(images), 3, *size_hw)
    if out is not None and (tuple(out.shape) != shape or out.dtype != torch.float32 or out.device != target
                            or not out.is_contiguous()):
        raise ValueError(f"apply_batch: out must be a contiguous float32 {list(shape)} tensor on {target}, "
                         f"got {out.dtype} {list(out.shape)} on {out.device}")
    # On the CPU, a few views at a time: each pass then stays in the core's cache instead of streaming
    # the whole batch through memory once per operation (which held two workers to one's speed).
    x = torch.empty(shape, device=target) if out is None else out
    step = max(1, CPU_PASS_BYTES // (3 * size_hw[0] * size_hw[1] * 4))
    for start in range(0, len(images), step):
        part = slice(start, start + step)
        x[part] = _colour_and_blur(_crops_by_size(images[part], host[part], size_hw), host[part], host[part], recipe,
                                   size_hw)
    return x


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the host) on ``device``; to a GPU through pinned memory, so the copy does not wait for it."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _rows(mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The views where the host ``mask`` is true, as indices on ``device``; None when there are none."""
    if not bool(mask.any()):
        return None
    return _to_device(mask.nonzero().squeeze(1), device)


def _colour_and_blur(x: torch.Tensor, params: torch.Tensor, host: torch.Tensor, recipe: Recipe,
                     out: tuple[int, int], fused: bool = False) -> torch.Tensor:
    """The colour operations, grayscale, blur and solarisation of cropped views ``x``, in place.

    ``params`` are the view rows on ``x``'s device (the factors), ``host`` the same rows on the CPU (the
    branches). Views are picked by index (``index_select``, ``index_copy_``), never by a device mask.
    ``fused``: the sequential jitter and grayscale, the blur and the solarisation through ``seed.augment_kernels``
    where they run.
    """
    if recipe.jitter_mode == "affine":
        x = _affine_colour(x, host)
    elif not (fused and _kernel_jitter(x, host)):                           # (the kernels: jitter and grayscale)
        x = _color_jitter(x, params, host)
        gray = _rows(host[:, COL["grayscale"]] > 0.5, x.device)
        if gray is not None:
            x.index_copy_(0, gray, _grayscale(x.index_select(0, gray)).expand(-1, 3, -1, -1))
    if fused and _kernel_blur(x, host, recipe, out):                         # blur and solarisation
        return x
    x = _gaussian_blur(x, params[:, COL["blur_sigma"]], host[:, COL["blur_sigma"]], recipe, out)
    sol = _rows(host[:, COL["solarize"]] > 0.5, x.device)
    if sol is not None:
        xs = x.index_select(0, sol)
        x.index_copy_(0, sol, torch.where(xs >= recipe.solarize_threshold, 1.0 - xs, xs))
    return x


# Float pixels per pass of the CPU path: 6 views at 224 px, a whole batch of 256 at 32 px.
CPU_PASS_BYTES = 4 << 20


def _crops_by_size(images: Sequence[torch.Tensor] | torch.Tensor, params: torch.Tensor,
                   out: tuple[int, int]) -> torch.Tensor:
    """The CPU path: one sampling call per source size, so an image's pixels depend on nothing but
    itself (bit-identical whatever else is in the batch)."""
    device = params.device
    x = torch.empty(len(images), 3, *out, device=device)                      # B x 3 x oh x ow
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault((int(im.shape[-2]), int(im.shape[-1])), []).append(i)
    for (h, w), idx in by_size.items():
        src = images if isinstance(images, torch.Tensor) and len(by_size) == 1 else torch.stack([images[i] for i in idx])
        rows = params if len(by_size) == 1 else params[idx]
        hw = torch.tensor([[h, w]], dtype=torch.float32, device=device).expand(len(idx), 2)
        crop = _resized_crop(src.to(device).float().div_(255.0), hw, (h, w), rows.float(), out)
        if len(by_size) == 1:
            return crop
        x[idx] = crop
    return x


# Float canvas memory per sampling call on CUDA; larger batches of large images are split.
CANVAS_BYTES = 1 << 29


_BOX = [COL["crop_x0"], COL["crop_y0"], COL["crop_w"], COL["crop_h"], COL["flip"]]


def _kernel_crops(images: Sequence[torch.Tensor] | torch.Tensor, host: torch.Tensor, out: tuple[int, int],
                  device: torch.device, copy_bytes: int = CANVAS_BYTES) -> torch.Tensor | None:
    """The CUDA path's crops by ``seed.augment_kernels`` (``host``: the view rows on the CPU): each view sampled
    from its own image, the batch's distinct images copied end to end once per launch; None where the kernels
    cannot run. Views go in order, as many per launch as ``copy_bytes`` of their distinct images allow (at
    least one), so full-size images (evaluation's) do not double the batch's memory on the GPU. A view's bits do
    not depend on the views launched with it."""
    from seed import augment_kernels  # imports Triton: only when asked for

    if len(images) == 0 or augment_kernels.unavailable():
        return None
    # the boxes from the host rows: indexing rows on the GPU by a list would copy the list there and wait
    boxes = _to_device(host[:, _BOX].float().contiguous(), device)
    x = torch.empty(len(images), 3, *out, device=device)                      # B x 3 x oh x ow
    images = list(images)  # each image kept alive while its id() stands for it (a tensor's rows are made anew)
    start = 0
    while start < len(images):
        slot: dict[int, int] = {}                                             # id(image) -> its index
        distinct: list[torch.Tensor] = []
        image_of: list[int] = []
        size, end = 0, start
        while end < len(images):
            im = images[end]
            if id(im) not in slot:
                if distinct and size + im.numel() > copy_bytes:
                    break
                slot[id(im)] = len(distinct)
                distinct.append(im.to(device))
                size += im.numel()
            image_of.append(slot[id(im)])
            end += 1
        if not augment_kernels.crops(distinct, image_of, boxes[start:end], out, into=x[start:end]):
            return None
        start = end
    return x


def _crops_on_canvas(images: Sequence[torch.Tensor] | torch.Tensor, params: torch.Tensor,
                     out: tuple[int, int], canvas_bytes: int = CANVAS_BYTES) -> torch.Tensor:
    """The CUDA path: every distinct image pasted once into the top-left corner of one zero canvas, then
    one sampling call per view rank (a few dozen kernel launches instead of ten per source size: on a
    GPU the launches, not the arithmetic, were the cost). Sampling positions are the same as the
    per-size path's up to float rounding of the grid normalised to the canvas's width W (about W x 6e-8 of a
    pixel, so a view's last bits depend on the widest image in its batch; and at a box's edge the sampling may
    take a trace of the canvas's zero padding: up to 1.25e-4 next to a 4,000 px image, measured).

    The canvas holds each image once and is turned to float once: sampling call r takes the r-th view
    of every image (an image with fewer views samples a stand-in, dropped), so no image is copied once
    per view. On an H100 the canvas copied per view and its float passes took about 2.4 of the
    augmentation's 8.3 ms of kernel time per 256 views (docs/benchmarks.md, run 7); now the copy is
    gone and, at V views per image, the float passes cover 1/V of the pixels. Each view's bits are
    those of a canvas copied per view."""
    device = params.device
    if isinstance(images, torch.Tensor):
        images = list(images)
    x = torch.empty(len(images), 3, *out, device=device)                      # B x 3 x oh x ow
    start = 0
    while start < len(images):  # views in order, as many per call as the canvas memory allows
        H = W = 0
        end = start
        while end < len(images):
            h, w = max(H, int(images[end].shape[-2])), max(W, int(images[end].shape[-1]))
            if end > start and (end - start + 1) * 3 * h * w * 4 > canvas_bytes:
                break
            H, W, end = h, w, end + 1
        slot: dict[int, int] = {}                                             # id(image) -> canvas slot
        distinct: list[torch.Tensor] = []
        seen: list[int] = []                                                  # per slot: its views so far
        ranks: list[dict[int, int]] = []                                      # per rank r: slot -> its r-th view
        for i, im in enumerate(images[start:end]):
            j = slot.setdefault(id(im), len(distinct))
            if j == len(distinct):
                distinct.append(im)
                seen.append(0)
            if seen[j] == len(ranks):
                ranks.append({})
            ranks[seen[j]][j] = i
            seen[j] += 1
        canvas = torch.zeros(len(distinct), 3, H, W, dtype=torch.uint8, device=device)
        for j, im in enumerate(distinct):
            canvas[j, :, : im.shape[-2], : im.shape[-1]] = im
        src = canvas.float().div_(255.0)                                      # n x 3 x H x W
        hw = _to_device(torch.tensor([[im.shape[-2], im.shape[-1]] for im in distinct], dtype=torch.float32), device)
        rows = params[start:end].float()
        first = [ranks[0][j] for j in range(len(distinct))]                   # every image's first view
        for views in ranks:
            pick = [views.get(j, first[j]) for j in range(len(distinct))]     # a stand-in where it has no r-th view
            crops = _resized_crop(src, hw, (H, W), rows.index_select(0, _to_device(torch.tensor(pick), device)), out)
            have = sorted(views)
            if len(have) < len(distinct):
                crops = crops.index_select(0, _to_device(torch.tensor(have), device))
            x.index_copy_(0, _to_device(torch.tensor([start + views[j] for j in have]), device), crops)
        start = end
    return x


def _resized_crop(src: torch.Tensor, hw: torch.Tensor, canvas: tuple[int, int], params: torch.Tensor,
                  out: tuple[int, int]) -> torch.Tensor:
    """Crop each view's box from its image and resize it to ``out``, flipping where asked.

    ``src [B, 3, H, W]`` holds view b's image in its top-left ``hw[b] = (h, w)`` corner (``canvas`` is
    ``(H, W)``). Bilinear, as torchvision's ``resized_crop`` without antialias: sampling is clamped to
    the box, like cropping first and resizing after, so nothing outside the image is ever read.
    """
    B, (H, W) = src.shape[0], canvas
    oh, ow = out
    h, w = hw[:, 0:1], hw[:, 1:2]                                             # B x 1 each
    x0, y0 = params[:, COL["crop_x0"], None] * w, params[:, COL["crop_y0"], None] * h
    bw, bh = params[:, COL["crop_w"], None] * w, params[:, COL["crop_h"], None] * h
    u = (torch.arange(ow, device=src.device, dtype=torch.float32) + 0.5) / ow  # ow, output pixel centres in (0, 1)
    v = (torch.arange(oh, device=src.device, dtype=torch.float32) + 0.5) / oh  # oh
    flip = params[:, COL["flip"], None] > 0.5
    u = torch.where(flip, 1.0 - u, u)                                         # B x ow
    xs = (x0 + u * bw).clamp(x0 + 0.5, x0 + bw - 0.5)                          # B x ow, source pixel coordinates
    ys = (y0 + v * bh).clamp(y0 + 0.5, y0 + bh - 0.5)                          # B x oh
    grid = torch.empty(B, oh, ow, 2, device=src.device)                       # normalised, align_corners=False
    grid[..., 0] = (2.0 * xs / W - 1.0)[:, None, :]                           # (filled by broadcasting: stacking
    grid[..., 1] = (2.0 * ys / H - 1.0)[:, :, None]                           # two expanded planes cost 4x more)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, 1, H, W]`` luma."""
    r, g, b = x.unbind(dim=1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _mean_luma(x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, 1, 1, 1]``, each image's mean luma summed in the same order whatever the batch
    size and thread count: row sums, then their sum. (One ``mean`` over an image's pixels is split across
    threads when the batch holds a single image, which changes its last bit.)"""
    g = _grayscale(x)
    B, _, H, W = g.shape
    return g.reshape(B, H, W).sum(dim=2).sum(dim=1).div_(H * W).view(B, 1, 1, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision ``_blend``: ``ratio * a + (1 - ratio) * b`` clamped to [0, 1]; ratio is ``[B]``."""
    r = ratio.view(-1, 1, 1, 1)
    return (r * a + (1.0 - r) * b).clamp_(0.0, 1.0)


def _adjust(op: int, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if op == 0:  # brightness: blend with black
        return _blend(x, torch.zeros_like(x), factor)
    if op == 1:  # contrast: blend with the mean luma of the image
        return _blend(x, _mean_luma(x), factor)
    if op == 2:  # saturation: blend with the luma image
        return _blend(x, _grayscale(x), factor)
    return _adjust_hue(x, factor)


_FACTORS = [COL["brightness"], COL["contrast"], COL["saturation"], COL["hue"]]


def jitter_codes(host: torch.Tensor) -> torch.Tensor:
    """``seed.augment_kernels``' int32 ``[B, 6]`` codes from the view rows on the host: the operation at each of
    the four positions (-1 for a view without jitter), the position of the contrast (4: none), grayscale."""
    ops = torch.where(host[:, COL["jitter"], None] > 0.5, host[:, COL["order_0"] : COL["order_3"] + 1].round().long(), -1)
    contrast_at = torch.where(ops == 1, torch.arange(4), 4).amin(dim=1, keepdim=True)
    return torch.cat([ops, contrast_at, (host[:, COL["grayscale"], None] > 0.5).long()], dim=1).int()


def _kernel_jitter(x: torch.Tensor, host: torch.Tensor) -> bool:
    from seed import augment_kernels  # imports Triton: only when asked for

    if augment_kernels.unavailable():
        return False
    codes = jitter_codes(host)
    if not ((codes[:, 0] >= 0).any() or codes[:, 5].any()):                  # no view jitters or turns grey
        return True
    return augment_kernels.jitter(x, _to_device(host[:, _FACTORS].float().contiguous(), x.device),
                                  _to_device(codes, x.device), contrast=bool((codes[:, 4] < 4).any()))


def _color_jitter(x: torch.Tensor, params: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    """ColorJitter with each image's own factors and operation order (``host``: the rows on the CPU)."""
    on = host[:, COL["jitter"]] > 0.5
    order = host[:, COL["order_0"] : COL["order_3"] + 1].round().long()        # B x 4
    for position in range(4):
        for op in range(4):
            sel = _rows(on & (order[:, position] == op), x.device)
            if sel is not None:
                x.index_copy_(0, sel, _adjust(op, x.index_select(0, sel), params[sel, _FACTORS[op]].float()))
    return x


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue rotation through HSV, as torchvision's tensor ``adjust_hue``; ``shift`` is ``[B]`` in [-0.5, 0.5]."""
    maxc = x.amax(dim=1)                                                      # amax: no indices, 5x faster than max
    cr = maxc - x.amin(dim=1)
    # Grey images: no hue to rotate, and the formula below gives max - 0 * ramp, i.e. x clamped. A shortcut
    # on the CPU only: on a GPU, asking whether any pixel has colour would wait for the queued kernels.
    if x.device.type == "cpu" and not cr.any():
        return x.clamp(0.0, 1.0)
    r, g, b = x.unbind(dim=1)                                                 # B x H x W each
    inv = 1.0 / torch.where(cr == 0, 1.0, cr)
    # torchvision's hr/hg/hb sum, written as one select: (g - b)/cr where red is the max, etc.
    h = torch.where(maxc == r, (g - b) * inv, torch.where(maxc == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)  # torchvision: (h + hue_factor) % 1.0
    # HSV -> RGB in closed form: channel n in (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1) with
    # k = (n + 6 h) mod 6 and v s = max - min. Same values as torchvision's six-way select, 5x cheaper.
    h6 = (h * 6.0).unsqueeze(1)                                               # B x 1 x H x W
    n = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)        # 5, 3, 1, made on the device
    k = n + h6                                                                # B x 3 x H x W, in [1, 11)
    k = torch.where(k >= 6.0, k - 6.0, k)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (maxc.unsqueeze(1) - cr.unsqueeze(1) * ramp).clamp_(0.0, 1.0)


# RGB -> YIQ (NTSC), with the luma row of ``_GRAY`` so that a hue rotation keeps the luma grayscale measures.
_YIQ = np.array([_GRAY, (0.596, -0.274, -0.322), (0.211, -0.523, 0.312)])
_LUMA = np.outer(np.ones(3), _GRAY)                                           # x -> its luma in all three channels


def affine_maps(host: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Each view's colour jitter and grayscale as one affine map (``jitter_mode: affine``), from its row.

    Returns float64 ``A, D`` ``[B, 3, 3]``: the view's colours become ``clamp(A x + D mu, 0, 1)`` with ``mu`` the
    crop's mean colour. Brightness scales (``f I``), saturation blends with the luma (``f I + (1 - f) L``,
    ``L`` the luma in all channels), the hue rotates the chroma plane of YIQ, grayscale is ``L``; contrast
    scales and adds ``(1 - f)`` times the mean luma of the image so far, which is linear in ``mu`` (the ``D``
    part). Composed in the view's drawn order, each operation multiplying from the left.
    """
    rows = host.numpy().astype(np.float64)
    B = len(rows)
    A = np.tile(np.eye(3), (B, 1, 1))
    D = np.zeros((B, 3, 3))
    on = rows[:, COL["jitter"]] > 0.5
    for position in range(4):
        op = np.rint(rows[:, COL[f"order_{position}"]]).astype(np.int64)
        for code, column in enumerate(("brightness", "contrast", "saturation", "hue")):
            sel = np.flatnonzero(on & (op == code))
            if not len(sel):
                continue
            f = rows[sel, COL[column]][:, None, None]
            if code == 0:
                A[sel], D[sel] = f * A[sel], f * D[sel]
            elif code == 1:   # mean luma of A x + D mu is g (A + D) mu: the offset gains (1 - f) L (A + D) mu
                D[sel] = f * D[sel] + (1.0 - f) * (_LUMA @ (A[sel] + D[sel]))
                A[sel] = f * A[sel]
            else:
                M = f * np.eye(3) + (1.0 - f) * _LUMA if code == 2 else _hue_rotation(rows[sel, COL["hue"]])
                A[sel], D[sel] = M @ A[sel], M @ D[sel]
    gray = np.flatnonzero(rows[:, COL["grayscale"]] > 0.5)
    A[gray], D[gray] = _LUMA @ A[gray], _LUMA @ D[gray]
    return A, D


def _hue_rotation(shift: np.ndarray) -> np.ndarray:
    """``[b, 3, 3]`` RGB maps rotating the YIQ chroma plane by ``shift`` of a turn, in the direction of
    torchvision's HSV ``adjust_hue`` (a positive shift turns red towards yellow)."""
    c, s = np.cos(2 * np.pi * shift), np.sin(2 * np.pi * shift)
    R = np.zeros((len(shift), 3, 3))
    R[:, 0, 0], R[:, 1, 1], R[:, 1, 2], R[:, 2, 1], R[:, 2, 2] = 1.0, c, s, -s, c
    return np.linalg.inv(_YIQ) @ R @ _YIQ


def _affine_colour(x: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    """``clamp(A x + D mu, 0, 1)`` for each view of ``x [B, 3, H, W]`` (``affine_maps``): a handful of passes
    over the batch, where the sequential jitter makes a few dozen and copies the views of each group.

    Elementwise products and sums, one operation at a time (no fused multiply-add, no matrix product whose
    blocking depends on the batch), so a view has the same bits in any batch."""
    A, D = affine_maps(host)
    B, _, H, W = x.shape
    maps = _to_device(torch.from_numpy(np.concatenate([A, D], axis=1).astype(np.float32)), x.device)  # B x 6 x 3
    a = maps[:, :3, :, None, None]                                            # B x 3 x 3 x 1 x 1
    y = torch.mul(a[:, :, 0], x[:, 0:1])                                      # B x 3 x H x W
    term = torch.mul(a[:, :, 1], x[:, 1:2])                                   # (two buffers for the whole sum:
    y.add_(term)                                                              # a fresh one per product costs
    y.add_(torch.mul(a[:, :, 2], x[:, 2:3], out=term))                        # page faults on the CPU)
    if D.any():                                                               # some view has contrast
        mu = x.sum(dim=3).sum(dim=2).div_(H * W)                              # B x 3, the same order in any batch
        d = maps[:, 3:]
        offset = d[:, :, 0] * mu[:, 0:1] + d[:, :, 1] * mu[:, 1:2] + d[:, :, 2] * mu[:, 2:3]  # B x 3
        y.add_(offset[:, :, None, None])
    return y.clamp_(0.0, 1.0)


def blur_kernel_size(recipe: Recipe, out: tuple[int, int]) -> int:
    """Odd kernel size covering 3 sigma of the recipe's largest blur at this output size, at most the output's
    shorter side: a blur wider than about a sixth of that side is cut there (a weaker blur than drawn; not at
    the default recipe at 32 or 224 px, whose kernels are 3 and 13 wide). Cached views replay with this rule,
    so it stays as caches were made with it.

    Fixed by the recipe and size (not by the batch), so an image blurs the same in any batch.
    """
    k = 2 * math.ceil(3.0 * blur_sigma_px(recipe, max(out))) + 1
    largest_odd = min(out) - (1 - min(out) % 2)  # reflect padding needs k // 2 < the image side
    return max(1, min(k, largest_odd))


def _blur_taps(sigma: torch.Tensor, recipe: Recipe, out: tuple[int, int]) -> torch.Tensor:
    """Each view's normalised Gaussian taps ``[b, k]`` for its ``sigma [b]`` (in the recipe's reference pixels)."""
    k = blur_kernel_size(recipe, out)
    s = (sigma.float() * max(out) / recipe.blur_reference_size).view(-1, 1)  # b x 1, in output pixels
    half = (k - 1) * 0.5
    grid = torch.linspace(-half, half, k, device=sigma.device)               # k
    kernel = torch.exp(-0.5 * (grid / s) ** 2)                                # b x k
    return kernel / kernel.sum(dim=1, keepdim=True)


def _kernel_blur(x: torch.Tensor, host: torch.Tensor, recipe: Recipe, out: tuple[int, int]) -> bool:
    """Blur and solarisation by ``seed.augment_kernels``; False where the kernels cannot run."""
    from seed import augment_kernels  # imports Triton: only when asked for

    if augment_kernels.unavailable():
        return False
    sigma, solarize = host[:, COL["blur_sigma"]], (host[:, COL["solarize"]] > 0.5).int()
    if not ((sigma > 0).any() or solarize.any()):
        return True
    taps = torch.full((len(host), blur_kernel_size(recipe, out)), -1.0)     # -1: no blur
    blurred = sigma > 0
    if blurred.any():
        taps[blurred] = _blur_taps(sigma[blurred], recipe, out)
    return augment_kernels.blur(x, _to_device(taps, x.device), _to_device(solarize, x.device), recipe.solarize_threshold)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, host_sigma: torch.Tensor, recipe: Recipe,
                   out: tuple[int, int]) -> torch.Tensor:
    """Separable Gaussian blur with each image's sigma (0 = no blur), reflect padding, as torchvision's.

    ``sigma`` is on ``x``'s device, ``host_sigma`` the same values on the CPU (which views blur)."""
    sel = _rows(host_sigma > 0, x.device)
    if sel is None:
        return x
    xs = x.index_select(0, sel)                                               # b x 3 x H x W
    b = xs.shape[0]
    k = blur_kernel_size(recipe, out)
    kernel = _blur_taps(sigma[sel], recipe, out)                              # b x k
    kernel = kernel[:, None, :].expand(b, 3, k).reshape(b * 3, k)             # 3b x k, one per channel (no
                                                                              # repeat_interleave: it reads its size back)
    pad = k // 2
    y = xs.reshape(1, b * 3, *xs.shape[-2:])
    y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel.view(b * 3, 1, 1, k), groups=b * 3)                # horizontal
    y = F.conv2d(y, kernel.view(b * 3, 1, k, 1), groups=b * 3)                # vertical
    x.index_copy_(0, sel, y.view(b, 3, *xs.shape[-2:]))
    return x
