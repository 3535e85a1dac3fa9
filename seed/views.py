"""A view's parameters: the augmentation recipe and the replayable rows drawn from it (numpy only).

A view is a fixed-width float32 row (``COLUMNS``). The teacher stage draws and stores the rows; the
student stage reads them back and applies them (``seed.augment.apply_batch``) to the same decoded
image, so the student sees exactly the view whose teacher embedding it is matched to.

Drawing follows torchvision's MoCo-v2 transform (He et al. / Chen et al. 2020, ``moco/main_moco.py``):
``RandomResizedCrop(scale=(0.2, 1))``, ``RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8)``,
``RandomGrayscale(p=0.2)``, ``RandomApply(GaussianBlur(sigma=[.1, 2.]), p=0.5)``,
``RandomHorizontalFlip()``. Each row is drawn from a generator seeded by ``(seed, key, view)``
alone, so parameters never depend on batch order, worker count or process.

This module imports no torch, so configs and caches can be read by light commands (``seed inspect``,
``seed config``).

Example:
    >>> row = draw_params(Recipe(), seed=0, key="img_0001", view=2, height=28, width=28)
    >>> row.shape == (P,)
    True
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import TypeVar

import numpy as np

# Column layout of one view row. Box coordinates are normalised to the source image size.
# ``order_k`` is the colour-jitter operation applied in position k: 0 brightness, 1 contrast,
# 2 saturation, 3 hue (torchvision's ColorJitter draws a random permutation of the four).
COLUMNS: tuple[str, ...] = (
    "crop_x0", "crop_y0", "crop_w", "crop_h",
    "flip",
    "jitter", "brightness", "contrast", "saturation", "hue",
    "order_0", "order_1", "order_2", "order_3",
    "grayscale",
    "blur_sigma",
    "solarize",
)
P = len(COLUMNS)
COL = {name: i for i, name in enumerate(COLUMNS)}
JITTER_MODES = ("sequential", "affine")

@dataclasses.dataclass(frozen=True)
class Recipe:
    """Augmentation recipe; defaults are MoCo-v2's (``moco/main_moco.py``, ``aug_plus``).

    ``blur_sigma`` is in pixels of a ``blur_reference_size`` output (MoCo-v2 blurs 224 px crops);
    at another output size the sigma is scaled with it, so a view looks the same at any resolution.

    ``jitter_mode`` says how a view's colour jitter and grayscale are applied; both read the same rows:
    - ``"sequential"`` (default): torchvision's ``ColorJitter`` on float images, the four operations in
      the view's drawn order, each clamped to [0, 1], the hue rotated through HSV, then grayscale.
    - ``"affine"``: the same operations composed into one 3x3 matrix plus offset per view and applied
      together, clamped once at the end; the hue is a rotation of the chroma plane in YIQ space and
      contrast blends with the mean luma of the unclamped image. Another recipe, not an approximation of
      the first to within rounding: on saturated colour images it moves the jittered views' pixels by 0.03
      of the range on average (``bench/jitter_modes.py``), and views without jitter not at all. It makes a
      handful of elementwise passes over the batch where the sequential jitter makes a few dozen (and
      copies each group of views out and back), which is where augmentation's GPU time goes.
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_reference_size: int = 224
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    jitter_mode: str = "sequential"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # numpy scalars (a recipe built in code) as Python numbers: float32
            value = getattr(self, f.name)   # fields would round the draws' arithmetic differently per path
            if isinstance(value, tuple):
                object.__setattr__(self, f.name, tuple(v.item() if isinstance(v, np.generic) else v for v in value))
            elif isinstance(value, np.generic):
                object.__setattr__(self, f.name, value.item())
        if self.jitter_mode not in JITTER_MODES:
            raise ValueError(f"recipe.jitter_mode must be one of {', '.join(JITTER_MODES)}, got {self.jitter_mode!r}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"recipe.{name} must be a probability in [0, 1], got {value}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"recipe.crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi < math.inf:
            raise ValueError(f"recipe.crop_ratio must satisfy 0 < min <= max (finite), got {self.crop_ratio}")
        for name in ("brightness", "contrast", "saturation"):  # (NaN fails every comparison: refused too)
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"recipe.{name} must be finite and >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"recipe.hue must be in [0, 0.5], got {self.hue}")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi < math.inf:
            raise ValueError(f"recipe.blur_sigma must satisfy 0 < min <= max (finite), got {self.blur_sigma}")
        if not 0 < self.blur_reference_size < math.inf:
            raise ValueError(f"recipe.blur_reference_size must be finite and > 0, got {self.blur_reference_size}")


def recipe_fields(recipe: Recipe) -> dict[str, object]:
    """The recipe as a cache's fingerprint records it. ``jitter_mode`` is left out at ``"sequential"``, the
    only mode before the setting existed, so caches made then keep their fingerprint; a cache whose
    recorded recipe has no ``jitter_mode`` was made with the sequential jitter (the dataclass default)."""
    fields = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)}
    if fields["jitter_mode"] == "sequential":
        del fields["jitter_mode"]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


# Below this largest sigma, in pixels of the view, a blur is a near no-op: its kernel's neighbour taps weigh
# under 0.14 of the centre (e^-2). MoCo-v2's sigma (at most 2 px of a 224 px view) scaled to a 32 px view is
# 0.29 px: measured on Fashion-MNIST, it changes a pixel by 0.0015 grey levels (of 255) on average
# (docs/design.md, "The recipe at small sizes").
BLUR_NOOP_PX = 0.5


def blur_sigma_px(recipe: Recipe, size: int) -> float:
    """The recipe's largest blur sigma in pixels of a view whose longer side is ``size``."""
    return recipe.blur_sigma[1] * size / recipe.blur_reference_size


def blur_note(recipe: Recipe, size: int) -> str | None:
    """A warning when the recipe blurs ``size``-pixel views by so little that the blur only costs time."""
    sigma = blur_sigma_px(recipe, size)
    if recipe.blur_p == 0 or sigma >= BLUR_NOOP_PX:
        return None
    return (f"cache.recipe: at {size} px the blur's largest sigma is {sigma:.2f} px (its sigma range is set for "
            f"{recipe.blur_reference_size} px views): a near no-op that only costs time; set cache.recipe.blur_p: 0, "
            "or cache.recipe.blur_reference_size to the view size the sigma range is meant for")


def _key_words(key: str) -> list[int]:
    """The four 32-bit words of a key's 128-bit BLAKE2b digest: the key's part of every view's seed."""
    return np.frombuffer(hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest(), dtype="<u4").tolist()


def view_rng(seed: int, key: str, view: int) -> np.random.Generator:
    """A generator that depends only on (seed, key, view): stable across processes and platforms."""
    return _rng(seed, view, _key_words(key))


def _rng(seed: int, view: int, words: list[int]) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, view, *words])))


def draw_params(recipe: Recipe, *, seed: int, key: str, view: int, height: int, width: int) -> np.ndarray:
    """Draw one view's parameters for an image of ``height`` x ``width`` pixels: a float32 row of P.

    The random stream is the cache's contract (a stored row must be drawable again from its seed, key
    and view): draws are consumed in this order, crop box, jitter on/off, jitter order, the three
    jitter factors, hue, grayscale, blur on/off, blur sigma, solarise, flip. A uniform on [lo, hi) is
    ``lo + (hi - lo) * u`` of one double ``u``, as numpy's ``Generator.uniform`` computes it, so the
    doubles are drawn in one call (``tests/unit/test_augment.py`` pins the rows' bytes).
    """
    return _draw(recipe, view_rng(seed, key, view), height, width)


def _draw(recipe: Recipe, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    row = np.zeros(P, dtype=np.float32)

    # RandomResizedCrop.get_params (torchvision), with the box normalised to the source size.
    top, left, h, w = _crop_box(rng, recipe, height, width)
    row[COL["crop_x0"]], row[COL["crop_y0"]] = left / width, top / height
    row[COL["crop_w"]], row[COL["crop_h"]] = w / width, h / height

    # Every random number is drawn whether or not its operation applies, so that a change of one
    # probability does not shift the draws of the operations after it.
    jitter = rng.random() < recipe.jitter_p
    order = rng.permutation(4)
    u = rng.random(9).tolist()
    factors = [_uniform(max(0.0, 1 - s), 1 + s, x)
               for s, x in zip((recipe.brightness, recipe.contrast, recipe.saturation), u[:3])]
    hue = _uniform(-recipe.hue, recipe.hue, u[3])
    grayscale, blur = u[4] < recipe.grayscale_p, u[5] < recipe.blur_p
    sigma = _uniform(*recipe.blur_sigma, u[6])
    solarize, flip = u[7] < recipe.solarize_p, u[8] < recipe.flip_p

    row[COL["flip"]] = float(flip)
    row[COL["jitter"]] = float(jitter)
    if jitter:
        row[COL["brightness"]], row[COL["contrast"]], row[COL["saturation"]] = factors
        row[COL["hue"]] = hue
    else:
        row[COL["brightness"]] = row[COL["contrast"]] = row[COL["saturation"]] = 1.0
    row[COL["order_0"] : COL["order_3"] + 1] = order
    row[COL["grayscale"]] = float(grayscale)
    row[COL["blur_sigma"]] = sigma if blur else 0.0
    row[COL["solarize"]] = float(solarize)
    return row


_Doubles = TypeVar("_Doubles", float, np.ndarray)


def _uniform(lo: float, hi: float, u: _Doubles) -> _Doubles:
    """numpy's ``Generator.uniform(lo, hi)`` given its double ``u`` (or an array of them): the same arithmetic,
    the same bits."""
    return lo + (hi - lo) * u


def _crop_box(rng: np.random.Generator, recipe: Recipe, height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: (top, left, h, w) in whole pixels."""
    area = height * width
    log_ratio = (math.log(recipe.crop_ratio[0]), math.log(recipe.crop_ratio[1]))
    for _ in range(10):
        u_scale, u_ratio = rng.random(2).tolist()
        target_area = area * _uniform(*recipe.crop_scale, u_scale)
        aspect = math.exp(_uniform(*log_ratio, u_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return _central_box(recipe, height, width)


def _central_box(recipe: Recipe, height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision's fallback when no try fits: the largest central box within the ratio range."""
    in_ratio = width / height
    if in_ratio < recipe.crop_ratio[0]:
        w, h = width, int(round(width / recipe.crop_ratio[0]))
    elif in_ratio > recipe.crop_ratio[1]:
        h, w = height, int(round(height * recipe.crop_ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_views(recipe: Recipe, *, seed: int, key: str, views: int, height: int, width: int,
               first: int = 0) -> np.ndarray:
    """Rows of views ``first .. first + views - 1`` of one image: float32 ``[views, P]``, each row the one
    ``draw_params`` gives (the key is hashed once for all of them)."""
    words = _key_words(key)
    return np.stack([_draw(recipe, _rng(seed, v, words), height, width) for v in range(first, first + views)])


def draw_many(recipe: Recipe, *, seed: int, keys: list[str], sizes: list[tuple[int, int]], views: int,
              first: int = 0) -> np.ndarray:
    """``draw_views`` for many images at once: float32 ``[len(keys), views, P]``, the same rows to the bit.

    Drawing one view at a time costs about 10 us, mostly numpy's per-call overhead on single numbers. Here
    every view's generator runs at once (``_Streams``: numpy's ``SeedSequence`` seeding and ``PCG64`` stream
    computed on arrays of generators), and each step of the draw, crop box, jitter order, factors, is one
    array operation over all the views that take it, in the order ``_draw`` consumes the stream.
    """
    out = np.empty((len(keys), views, P), dtype=np.float32)
    if not keys or not views:
        return out
    words = [_key_words(k) for k in keys]
    if first + views > 1 << 32:  # a view index of two words: entropy rows of several lengths, numpy's own seeding
        seeded = [np.random.PCG64(np.random.SeedSequence([seed, v, *w])).state["state"]
                  for w in words for v in range(first, first + views)]
        streams = _Streams.from_ints([s["state"] for s in seeded], [s["inc"] for s in seeded])
    else:
        seed_words = _int_words(seed)
        entropy = np.array([[*seed_words, v, *w] for w in words for v in range(first, first + views)], dtype=np.uint32)
        streams = _Streams(*_pcg64_states(entropy))
    hw = np.repeat(np.array(sizes, dtype=np.int64).reshape(-1, 2), views, axis=0)
    if hw.min() < 1 or hw.max() >= 1 << 31:  # (the bounded draws here are numpy's 32-bit ones)
        i = int(np.flatnonzero((hw < 1).any(axis=1) | (hw >= 1 << 31).any(axis=1))[0]) // views
        raise ValueError(f"draw_many: image {keys[i]!r} is {sizes[i][0]} x {sizes[i][1]} px; sides must be 1 to 2^31 - 1")
    out.reshape(-1, P)[:] = _draw_rows(recipe, streams, hw[:, 0], hw[:, 1])
    return out


def _draw_rows(recipe: Recipe, g: _Streams, height: np.ndarray, width: np.ndarray) -> np.ndarray:
    """``_draw`` for every generator of ``g`` at once: float32 ``[n, P]``; ``height``, ``width``: int64 ``[n]``."""
    n = len(height)
    everyone = np.arange(n)
    row = np.zeros((n, P), dtype=np.float32)

    # the crop box: up to 10 tries of (scale, log-ratio), as _crop_box
    top, left, h, w = (np.zeros(n, dtype=np.int64) for _ in range(4))
    area = height * width
    log_lo, log_hi = math.log(recipe.crop_ratio[0]), math.log(recipe.crop_ratio[1])
    todo = everyone
    for _ in range(10):
        if not len(todo):
            break
        u = g.doubles(todo, 2)
        target_area = area[todo] * _uniform(*recipe.crop_scale, u[:, 0])
        # math.exp, as _crop_box: numpy's exp may differ from the C library's in the last bit
        aspect = np.array([math.exp(x) for x in _uniform(log_lo, log_hi, u[:, 1]).tolist()])
        tw = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
        th = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
        fits = (tw > 0) & (tw <= width[todo]) & (th > 0) & (th <= height[todo])
        took = todo[fits]
        h[took], w[took] = th[fits], tw[fits]
        top[took] = g.integers(took, height[took] - h[took] + 1)
        left[took] = g.integers(took, width[took] - w[took] + 1)
        todo = todo[~fits]
    for i in todo.tolist():  # no try fitted: torchvision's central crop (draws nothing)
        top[i], left[i], h[i], w[i] = _central_box(recipe, int(height[i]), int(width[i]))
    row[:, COL["crop_x0"]], row[:, COL["crop_y0"]] = left / width, top / height
    row[:, COL["crop_w"]], row[:, COL["crop_h"]] = w / width, h / height

    jitter = g.doubles(everyone, 1)[:, 0] < recipe.jitter_p
    order = g.permutations(everyone, 4)
    u = g.doubles(everyone, 9)
    row[:, COL["flip"]] = u[:, 8] < recipe.flip_p
    row[:, COL["jitter"]] = jitter
    for k, (name, s) in enumerate((("brightness", recipe.brightness), ("contrast", recipe.contrast),
                                   ("saturation", recipe.saturation))):
        row[:, COL[name]] = np.where(jitter, _uniform(max(0.0, 1 - s), 1 + s, u[:, k]), 1.0)
    row[:, COL["hue"]] = np.where(jitter, _uniform(-recipe.hue, recipe.hue, u[:, 3]), 0.0)
    row[:, COL["order_0"] : COL["order_3"] + 1] = order
    row[:, COL["grayscale"]] = u[:, 4] < recipe.grayscale_p
    row[:, COL["blur_sigma"]] = np.where(u[:, 5] < recipe.blur_p, _uniform(*recipe.blur_sigma, u[:, 6]), 0.0)
    row[:, COL["solarize"]] = u[:, 7] < recipe.solarize_p
    return row


# numpy's SeedSequence (numpy/random/bit_generator.pyx) and PCG64 (pcg64.h), for ``draw_many``
_MASK32, _MASK64 = (1 << 32) - 1, (1 << 64) - 1
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R, _XSHIFT, _POOL = 0xCA01F9DD, 0x4973F715, 16, 4
_PCG_MULT = (2549297995355413924 << 64) + 4865540595714422341
_LO32, _SH32 = np.uint64(_MASK32), np.uint64(32)  # the low half's mask, the halves' shift

_Pair = tuple[np.ndarray, np.ndarray]
"""A 128-bit unsigned integer per element, as its (high, low) 64-bit halves: two uint64 arrays."""


def _split(values: list[int]) -> _Pair:
    hi, lo = (np.array([v >> 64 for v in values], dtype=np.uint64), np.array([v & _MASK64 for v in values], dtype=np.uint64))
    hi.flags.writeable = lo.flags.writeable = False                         # (kept in _jumps's cache)
    return hi, lo


def _mul128(a: _Pair, b: _Pair) -> _Pair:
    """``a * b mod 2^128``, elementwise (broadcasting). The low halves' full 128-bit product is built from
    32-bit limbs (no partial product exceeds 64 bits); the cross products ``ah bl`` and ``al bh`` only reach the
    high half, so their wrap mod 2^64 is what is wanted."""
    (ah, al), (bh, bl) = a, b
    a0, a1, b0, b1 = al & _LO32, al >> _SH32, bl & _LO32, bl >> _SH32
    p00, p01, p10 = a0 * b0, a0 * b1, a1 * b0
    mid = (p00 >> _SH32) + (p01 & _LO32) + (p10 & _LO32)
    low = (p00 & _LO32) | (mid << _SH32)
    high = a1 * b1 + (p01 >> _SH32) + (p10 >> _SH32) + (mid >> _SH32) + ah * bl + al * bh
    return high, low


def _add128(a: _Pair, b: _Pair) -> _Pair:
    low = a[1] + b[1]
    return a[0] + b[0] + (low < a[1]), low


@functools.lru_cache(maxsize=8)
def _jumps(start: int, stop: int) -> tuple[_Pair, _Pair]:
    """For steps ``k`` in ``[start, stop)``: ``M^k`` and ``1 + M + ... + M^(k-1)`` mod 2^128 (``M`` PCG64's
    multiplier), which take a seed's state and increment to its ``k``-th state in one step."""
    steps = range(start, stop)
    powers = [pow(_PCG_MULT, k, 1 << 128) for k in steps]
    # (M^k - 1) / (M - 1), exact: M^k taken mod (M - 1) 2^128 keeps the quotient's low 128 bits
    sums = [(pow(_PCG_MULT, k, (_PCG_MULT - 1) << 128) - 1) // (_PCG_MULT - 1) for k in steps]
    return _split(powers), _split(sums)


class _Streams:
    """The PCG64 generators of many views, stepped together: numpy's ``Generator`` calls the draw makes
    (``random``, ``integers(0, high)``, ``permutation``), each over a chosen subset of the generators.

    PCG64 is a 128-bit linear congruential state with an XSL-RR output. The ``k``-th state after the seed is
    ``M^k s + (M^(k-1) + ... + 1) inc``, so the outputs are computed a block of steps at a time for every
    generator; each generator reads its own stream from its own position. 32-bit draws halve one 64-bit output
    and keep the other half for the next 32-bit draw, as numpy's ``PCG64`` does.
    """

    BLOCK = 24  # steps computed at a time: a view's usual draw takes 15

    def __init__(self, state: _Pair, inc: _Pair) -> None:
        self.state, self.inc = (state[0][:, None], state[1][:, None]), (inc[0][:, None], inc[1][:, None])
        n = len(state[0])
        self.raw = np.empty((n, 0), dtype=np.uint64)
        self.pos = np.zeros(n, dtype=np.int64)
        self.has32 = np.zeros(n, dtype=bool)
        self.half = np.zeros(n, dtype=np.uint64)

    @classmethod
    def from_ints(cls, states: list[int], incs: list[int]) -> _Streams:
        return cls(_split(states), _split(incs))

    def _extend(self, need: int) -> None:
        done = self.raw.shape[1]
        powers, sums = _jumps(done + 1, max(need, done + self.BLOCK) + 1)
        hi, lo = _add128(_mul128(self.state, powers), _mul128(self.inc, sums))
        x = hi ^ lo                                                           # XSL-RR: xor the halves,
        r = hi >> np.uint64(58)                                               # rotate right by the top 6 bits
        self.raw = np.concatenate([self.raw, (x >> r) | (x << ((np.uint64(64) - r) & np.uint64(63)))], axis=1)

    def next64(self, who: np.ndarray, count: int = 1) -> np.ndarray:
        """The next ``count`` 64-bit outputs of generators ``who``: uint64 ``[len(who), count]``."""
        at = self.pos[who][:, None] + np.arange(count)
        if len(who) and at.max() >= self.raw.shape[1]:
            self._extend(int(at.max()) + 1)
        self.pos[who] += count
        return self.raw[who[:, None], at]

    def doubles(self, who: np.ndarray, count: int) -> np.ndarray:
        """``Generator.random(count)`` of each of ``who``: float64 ``[len(who), count]`` in [0, 1)."""
        return (self.next64(who, count) >> np.uint64(11)) * (1.0 / 9007199254740992.0)

    def next32(self, who: np.ndarray) -> np.ndarray:
        """One 32-bit draw of each of ``who`` (uint64): the kept half where there is one, else a new output's
        low half, keeping its high half."""
        out = np.empty(len(who), dtype=np.uint64)
        kept = self.has32[who]
        out[kept] = self.half[who[kept]]
        fresh = who[~kept]
        value = self.next64(fresh)[:, 0]
        out[~kept] = value & _LO32
        self.half[fresh] = value >> _SH32
        self.has32[who] = ~kept
        return out

    def integers(self, who: np.ndarray, high: np.ndarray) -> np.ndarray:
        """``Generator.integers(0, high)`` of each of ``who`` (``high`` from 1 to 2^32 - 1): Lemire's bounded
        32-bit draw with numpy's rejection threshold; a range of one value draws nothing."""
        out = np.zeros(len(who), dtype=np.int64)
        draw = np.flatnonzero(high > 1)
        span = high[draw].astype(np.uint64)                                   # the range, high - 0
        m = self.next32(who[draw]) * span
        threshold = (np.uint64(_MASK32) - (span - np.uint64(1))) % span
        redo = np.flatnonzero((m & _LO32) < threshold)
        while len(redo):
            m[redo] = self.next32(who[draw[redo]]) * span[redo]
            redo = redo[(m[redo] & _LO32) < threshold[redo]]
        out[draw] = (m >> _SH32).astype(np.int64)
        return out

    def permutations(self, who: np.ndarray, n: int) -> np.ndarray:
        """``Generator.permutation(n)`` of each of ``who``: int64 ``[len(who), n]``; Fisher-Yates from the end,
        each index a masked 32-bit draw redrawn until it is in range (numpy's ``random_interval``)."""
        perm = np.tile(np.arange(n, dtype=np.int64), (len(who), 1))
        rows = np.arange(len(who))
        for i in range(n - 1, 0, -1):
            mask = np.uint64((1 << i.bit_length()) - 1)
            j = self.next32(who) & mask
            redo = np.flatnonzero(j > np.uint64(i))
            while len(redo):
                j[redo] = self.next32(who[redo]) & mask
                redo = redo[j[redo] > np.uint64(i)]
            j = j.astype(np.int64)
            swapped = perm[rows, j]
            perm[rows, j] = perm[rows, i]
            perm[rows, i] = swapped
        return perm


def _int_words(value: int) -> list[int]:
    """A non-negative int as SeedSequence takes it: little-endian 32-bit words, at least one."""
    if value < 0:
        raise ValueError(f"seed must be >= 0, got {value}")
    words = [value & _MASK32]
    while value >> 32:
        value >>= 32
        words.append(value & _MASK32)
    return words


def _pcg64_states(entropy: np.ndarray) -> tuple[_Pair, _Pair]:
    """``(state, inc)`` of ``PCG64(SeedSequence(row))`` for each row of ``entropy`` (uint32 ``[n, L]``), computed
    for all rows at once: SeedSequence's hash of the row into a pool of four words, four 64-bit words drawn
    from the pool, then PCG64's seeding (``tests/unit/test_augment.py`` checks it against numpy)."""
    n, length = entropy.shape
    const = [_INIT_A]

    def hashmix(value: np.ndarray) -> np.ndarray:
        value = value ^ np.uint32(const[0])
        const[0] = (const[0] * _MULT_A) & _MASK32
        value = value * np.uint32(const[0])
        return value ^ (value >> np.uint32(_XSHIFT))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r: np.ndarray = np.subtract(x * np.uint32(_MIX_MULT_L), y * np.uint32(_MIX_MULT_R), dtype=np.uint32)
        return r ^ (r >> np.uint32(_XSHIFT))

    pool = [hashmix(entropy[:, i] if i < length else np.zeros(n, np.uint32)) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(_POOL, length):
        for dst in range(_POOL):
            pool[dst] = mix(pool[dst], hashmix(entropy[:, src]))
    const_b, words = _INIT_B, []
    for i in range(8):  # generate_state(4, uint64): eight 32-bit words, cycling through the pool
        value = pool[i % _POOL] ^ np.uint32(const_b)
        const_b = (const_b * _MULT_B) & _MASK32
        value = value * np.uint32(const_b)
        words.append(value ^ (value >> np.uint32(_XSHIFT)))
    w = np.stack(words, 1).astype(np.uint64)
    s = w[:, 0::2] | (w[:, 1::2] << _SH32)                                     # four 64-bit words per row
    initstate = (s[:, 0], s[:, 1])
    inc = ((s[:, 2] << np.uint64(1)) | (s[:, 3] >> np.uint64(63)), (s[:, 3] << np.uint64(1)) | np.uint64(1))
    # pcg_setseq_128_srandom_r: state 0 stepped (giving inc), plus initstate, stepped again
    state = _add128(_mul128(_add128(inc, initstate), _split([_PCG_MULT])), inc)
    return state, inc
