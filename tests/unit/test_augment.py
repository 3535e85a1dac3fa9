"""Replayable augmentation: deterministic draws, exact replay, and agreement with torchvision."""

from __future__ import annotations

import hashlib
import math
import re

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from seed import augment as seed_augment
from seed.augment import apply_batch, blur_kernel_size
from seed.views import COL, COLUMNS, P, Recipe, blur_note, draw_params, draw_views, recipe_fields

RECIPE = Recipe()
AFFINE = Recipe(jitter_mode="affine")


def _rows(n: int, h: int = 28, w: int = 28, seed: int = 0) -> np.ndarray:
    return np.stack([draw_params(RECIPE, seed=seed, key=f"img{i}", view=i % 3, height=h, width=w) for i in range(n)])


def test_draw_is_a_function_of_seed_key_view() -> None:
    a = draw_params(RECIPE, seed=3, key="n01440764_10026", view=1, height=375, width=500)
    b = draw_params(RECIPE, seed=3, key="n01440764_10026", view=1, height=375, width=500)
    assert a.dtype == np.float32 and a.shape == (P,) and len(COLUMNS) == P
    assert np.array_equal(a, b)
    assert not np.array_equal(a, draw_params(RECIPE, seed=3, key="n01440764_10026", view=2, height=375, width=500))
    assert not np.array_equal(a, draw_params(RECIPE, seed=4, key="n01440764_10026", view=1, height=375, width=500))
    assert not np.array_equal(a, draw_params(RECIPE, seed=3, key="n01440764_10027", view=1, height=375, width=500))


def _reference_row(recipe: Recipe, seed: int, key: str, view: int, height: int, width: int) -> np.ndarray:
    """The draw written plainly, one numpy call per random number, in the contract's order."""
    words = np.frombuffer(hashlib.blake2b(key.encode(), digest_size=16).digest(), dtype="<u4").tolist()
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, view, *words])))
    box = None
    for _ in range(10):
        area = height * width * rng.uniform(*recipe.crop_scale)
        aspect = math.exp(rng.uniform(math.log(recipe.crop_ratio[0]), math.log(recipe.crop_ratio[1])))
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            box = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
            break
    if box is None:  # torchvision's central fallback
        r = width / height
        h, w = ((int(round(width / recipe.crop_ratio[0])), width) if r < recipe.crop_ratio[0] else
                (height, int(round(height * recipe.crop_ratio[1]))) if r > recipe.crop_ratio[1] else (height, width))
        box = ((height - h) // 2, (width - w) // 2, h, w)
    jitter = rng.random() < recipe.jitter_p
    order = rng.permutation(4)
    factors = [rng.uniform(max(0.0, 1 - s), 1 + s) for s in (recipe.brightness, recipe.contrast, recipe.saturation)]
    hue = rng.uniform(-recipe.hue, recipe.hue)
    gray, blur = rng.random() < recipe.grayscale_p, rng.random() < recipe.blur_p
    sigma = rng.uniform(*recipe.blur_sigma)
    solarize, flip = rng.random() < recipe.solarize_p, rng.random() < recipe.flip_p
    top, left, h, w = box
    return np.array([left / width, top / height, w / width, h / height, flip, jitter,
                     *(factors if jitter else [1.0, 1.0, 1.0]), hue if jitter else 0.0, *order, gray,
                     sigma if blur else 0.0, solarize], dtype=np.float32)


def test_draw_matches_a_plain_reference_and_its_pinned_bytes() -> None:
    """A stored view row must be drawable again from (seed, key, view) by any later version: the draw
    equals a one-call-per-number reference, including the crop's fallback (1 x 1 and 7 x 300 sources),
    and its bytes over 600 rows are pinned (any change to the stream breaks replay of existing caches)."""
    recipe = Recipe(solarize_p=0.3)
    digest = hashlib.sha256()
    for i in range(300):
        h, w = [(28, 28), (375, 500), (7, 300), (1, 1)][i % 4]
        rows = draw_views(recipe, seed=i % 5, key=f"n0144_{i}", views=2, height=h, width=w)
        for v in range(2):
            assert rows[v].tobytes() == _reference_row(recipe, i % 5, f"n0144_{i}", v, h, w).tobytes(), (i, v)
        digest.update(rows.tobytes())
    assert digest.hexdigest() == "5acf60ca5e21a9189cdd9c08ffd67106f09aa60d7a2aa0c190b2f4b8fb716f75"


def test_drawing_many_images_at_once_gives_the_same_rows_and_the_same_pinned_bytes() -> None:
    """``draw_many`` (the teacher stage's: every view's seeding and stream computed on arrays) against the pinned
    stream: the same 600 rows as above, byte for byte, and ``draw_views`` image by image for multi-word seeds,
    view offsets (past 2^32: numpy's seeding) and odd keys; its seeding against numpy's own
    ``PCG64(SeedSequence(...))`` state; sizes it cannot draw for, and recipes of numpy scalars."""
    from seed.views import _int_words, _pcg64_states, draw_many

    recipe = Recipe(solarize_p=0.3)
    digest = hashlib.sha256()
    for seed in range(5):
        idx = [i for i in range(300) if i % 5 == seed]
        sizes = [[(28, 28), (375, 500), (7, 300), (1, 1)][i % 4] for i in idx]
        rows = draw_many(recipe, seed=seed, keys=[f"n0144_{i}" for i in idx], sizes=sizes, views=2)
        for i, r in zip(idx, rows):
            h, w = sizes[idx.index(i)]
            assert r.tobytes() == draw_views(recipe, seed=seed, key=f"n0144_{i}", views=2, height=h, width=w).tobytes()
    for i in range(300):  # in the reference test's order
        digest.update(draw_many(recipe, seed=i % 5, keys=[f"n0144_{i}"], sizes=[[(28, 28), (375, 500), (7, 300), (1, 1)][i % 4]],
                                views=2).tobytes())
    assert digest.hexdigest() == "5acf60ca5e21a9189cdd9c08ffd67106f09aa60d7a2aa0c190b2f4b8fb716f75"

    rng = np.random.default_rng(0)
    keys = ["", "a/b c", "ü" * 40, *(f"k{int(x)}" for x in rng.integers(0, 10**12, 30))]
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 900, (len(keys), 2))]
    for seed, first, views in ((0, 0, 4), (2**32, 6, 2), (2**70 + 9, 0, 1), (123, 2**31, 3), (5, 2**32 - 2, 4)):
        many = draw_many(RECIPE, seed=seed, keys=keys, sizes=sizes, views=views, first=first)
        one = np.stack([draw_views(RECIPE, seed=seed, key=k, views=views, height=h, width=w, first=first)
                        for k, (h, w) in zip(keys, sizes)])
        assert many.tobytes() == one.tobytes(), (seed, first)
    for seed in (0, 9, 2**40, 2**100):
        entropy = [[*_int_words(seed), v, *map(int, rng.integers(0, 2**32, 4))] for v in (0, 1, 77, 2**32 - 1)]
        (state_hi, state_lo), (inc_hi, inc_lo) = _pcg64_states(np.array(entropy, dtype=np.uint32))
        for i, row in enumerate(entropy):
            assert np.random.PCG64(np.random.SeedSequence([seed, *row[-5:]])).state["state"] == {
                "state": int(state_hi[i]) << 64 | int(state_lo[i]), "inc": int(inc_hi[i]) << 64 | int(inc_lo[i])}
    assert draw_many(RECIPE, seed=0, keys=[], sizes=[], views=2).shape == (0, 2, len(COLUMNS))
    for bad in ((5, 0), (2**31, 7)):
        with pytest.raises(ValueError, match="'b' is .* sides must be"):
            draw_many(RECIPE, seed=0, keys=["a", "b"], sizes=[(3, 3), bad], views=2)
    f32 = Recipe(crop_scale=(np.float32(0.2), np.float32(1.0)), brightness=np.float32(0.4), hue=np.float64(0.1))
    assert type(f32.brightness) is float and type(f32.crop_scale[0]) is float
    many = draw_many(f32, seed=1, keys=keys, sizes=sizes, views=2)
    assert many.tobytes() == np.stack([draw_views(f32, seed=1, key=k, views=2, height=h, width=w)
                                       for k, (h, w) in zip(keys, sizes)]).tobytes()


def test_many_generators_stepped_together_give_numpys_numbers() -> None:
    """``draw_many``'s generators (``seed.views._Streams``) against numpy's ``Generator`` on the same seeds, call
    for call: doubles, bounded integers over ranges up to 2^32 - 1 (where Lemire's draw rejects about half the
    time), permutations (whose masked draws reject), 32-bit halves kept between calls, streams read past the
    first block of steps, and each generator called a different number of times."""
    from seed.views import _Streams

    n = 40
    seeds = [np.random.PCG64(np.random.SeedSequence([7, i])) for i in range(n)]
    state = [s.state["state"] for s in seeds]
    ours = _Streams.from_ints([s["state"] for s in state], [s["inc"] for s in state])
    theirs = [np.random.Generator(s) for s in seeds]
    pick = np.random.default_rng(1)
    for step in range(60):
        who = np.flatnonzero(pick.random(n) < 0.7)
        kind = step % 4
        if kind == 0:
            got, want = ours.doubles(who, 3), np.stack([theirs[i].random(3) for i in who])
        elif kind == 1:
            high = pick.integers(1, 2**32, len(who))
            high[::5] = 1                                                     # one value: nothing drawn
            got = ours.integers(who, high)
            want = np.array([theirs[i].integers(0, h) for i, h in zip(who, high)])
        elif kind == 2:
            got, want = ours.permutations(who, 6), np.stack([theirs[i].permutation(6) for i in who])
        else:
            high = pick.integers(1, 50, len(who))
            got = ours.integers(who, high)
            want = np.array([theirs[i].integers(0, h) for i, h in zip(who, high)])
        assert got.tolist() == want.tolist(), step
    assert ours.raw.shape[1] > _Streams.BLOCK                                 # past the first block


def test_draw_does_not_depend_on_order() -> None:
    keys = [f"k{i}" for i in range(50)]
    forward = {k: draw_views(RECIPE, seed=0, key=k, views=4, height=28, width=28) for k in keys}
    backward = {k: draw_views(RECIPE, seed=0, key=k, views=4, height=28, width=28) for k in reversed(keys)}
    assert all(np.array_equal(forward[k], backward[k]) for k in keys)


class _Keys(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(draw_params(RECIPE, seed=7, key=f"key{i}", view=i % 4, height=32, width=48))


@pytest.mark.parametrize("workers", [0, 2])
def test_draw_does_not_depend_on_worker_count(workers: int) -> None:
    loader = torch.utils.data.DataLoader(_Keys(), batch_size=8, num_workers=workers, shuffle=False)
    got = torch.cat(list(loader)).numpy()
    expected = np.stack([draw_params(RECIPE, seed=7, key=f"key{i}", view=i % 4, height=32, width=48) for i in range(40)])
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("hw", [(28, 28), (375, 500), (500, 375), (7, 300), (300, 7), (1, 1)])
def test_crop_box_stays_inside_the_image(hw: tuple[int, int]) -> None:
    h, w = hw
    rows = np.stack([draw_params(RECIPE, seed=s, key="x", view=v, height=h, width=w) for s in range(50) for v in range(4)])
    x0, y0, bw, bh = (rows[:, COL[c]] for c in ("crop_x0", "crop_y0", "crop_w", "crop_h"))
    assert (x0 >= 0).all() and (y0 >= 0).all() and (bw > 0).all() and (bh > 0).all()
    assert (x0 + bw <= 1 + 1e-6).all() and (y0 + bh <= 1 + 1e-6).all()
    # whole pixels, as torchvision's RandomResizedCrop
    assert np.allclose(x0 * w, np.round(x0 * w), atol=1e-3) and np.allclose(bh * h, np.round(bh * h), atol=1e-3)


def test_probabilities_match_the_recipe() -> None:
    rows = np.stack([draw_params(RECIPE, seed=0, key=f"k{i}", view=0, height=64, width=64) for i in range(4000)])
    assert abs(rows[:, COL["jitter"]].mean() - 0.8) < 0.03
    assert abs(rows[:, COL["grayscale"]].mean() - 0.2) < 0.03
    assert abs((rows[:, COL["blur_sigma"]] > 0).mean() - 0.5) < 0.03
    assert abs(rows[:, COL["flip"]].mean() - 0.5) < 0.03
    area = rows[:, COL["crop_w"]] * rows[:, COL["crop_h"]]
    assert area.min() >= 0.2 - 0.02 and area.max() <= 1.0
    jittered = rows[rows[:, COL["jitter"]] == 1]
    assert jittered[:, COL["brightness"]].min() >= 0.6 - 1e-6 and jittered[:, COL["brightness"]].max() <= 1.4 + 1e-6
    assert np.abs(jittered[:, COL["hue"]]).max() <= 0.1 + 1e-6
    orders = jittered[:, COL["order_0"]: COL["order_3"] + 1]
    assert (np.sort(orders, axis=1) == np.arange(4)).all() and len({tuple(o) for o in orders}) == 24


@pytest.mark.parametrize("recipe", [RECIPE, AFFINE], ids=["sequential", "affine"])
def test_replay_is_bit_exact_and_batch_independent(recipe: Recipe) -> None:
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 28, 28), generator=g, dtype=torch.uint8) for _ in range(16)]
    images += [torch.randint(0, 256, (3, 40, 33), generator=g, dtype=torch.uint8) for _ in range(4)]
    params = torch.from_numpy(np.concatenate([_rows(16), _rows(4, 40, 33, seed=1)]))
    a = apply_batch(images, params, recipe, 32)
    b = apply_batch(images, params, recipe, 32)
    assert a.shape == (20, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    # The same image in another batch (other neighbours, another canvas size) gives the same bits.
    for i in (0, 5, 17):
        alone = apply_batch([images[i]], params[i: i + 1], recipe, 32)
        assert torch.equal(alone[0], a[i]), i
    perm = torch.randperm(20, generator=g)
    shuffled = apply_batch([images[i] for i in perm], params[perm], recipe, 32)
    assert torch.equal(shuffled, a[perm])
    # Naming the device (as the stages do, with the rows on the host) changes nothing.
    assert torch.equal(apply_batch(images, params, recipe, 32, device="cpu"), a)


@pytest.mark.parametrize("recipe", [RECIPE, AFFINE], ids=["sequential", "affine"])
def test_the_gpu_path_gives_the_cpu_path_views(recipe: Recipe) -> None:
    """The CUDA path (every view cropped from one canvas, then the colour operations over the whole
    batch, branches read from the host rows) run on the CPU: the same views as the CPU path, up to the
    canvas's float rounding of the sampling grid."""
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 28 + i, 30 - i), generator=g, dtype=torch.uint8) for i in range(6)]
    images = [im for im in images for _ in range(4)]                          # 4 views of each image
    params = torch.from_numpy(np.concatenate([_rows(4, 28 + i, 30 - i, seed=i) for i in range(6)]))
    assert (params[:, COL["jitter"]] > 0.5).any() and (params[:, COL["blur_sigma"]] > 0).any()
    gpu_path = seed_augment._colour_and_blur(seed_augment._crops_on_canvas(images, params, (32, 32)), params, params, recipe, (32, 32))
    assert torch.allclose(gpu_path, apply_batch(images, params, recipe, 32), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the augmentation kernels (seed.augment_kernels)")
def test_augmentation_kernels_give_the_cpu_paths_views_on_cuda() -> None:
    """On the GPU, ``fused_augment`` runs the crops and the jitter as Triton kernels (not the fallback), and the
    views are the CPU path's up to float rounding, as the tensor path's are: at 224 px from 300-400 px images
    (several blocks of pixels a view, V = 2) and at 32 px. On noise images, whose neighbouring pixels differ by up
    to the whole range, coordinate rounding shows: the same code run on the CPU (the kernels under Triton's
    interpreter, the tensor path's canvas) gave 4.1e-5 and 1.6e-4 at 224 px; the bounds leave room for CUDA's
    division and fused multiply-adds."""
    from seed import augment_kernels

    g = torch.Generator().manual_seed(6)
    for size, sizes in ((224, [(300 + 7 * i, 400 - 5 * i) for i in range(20)]), (32, [(28, 28)] * 32)):
        images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
        params = torch.from_numpy(np.stack([draw_params(RECIPE, seed=7, key=f"k{i}", view=v, height=h, width=w)
                                            for i, (h, w) in enumerate(sizes) for v in range(2)]))
        per_view = [im for im in images for _ in range(2)]
        cpu = apply_batch(per_view, params, RECIPE, size)
        on_gpu = [im.cuda() for im in images]
        per_view_gpu = [im for im in on_gpu for _ in range(2)]
        fused = apply_batch(per_view_gpu, params, RECIPE, size, "cuda", fused_augment=True).cpu()
        assert augment_kernels.unavailable() is None
        tensor_path = apply_batch(per_view_gpu, params, RECIPE, size, "cuda").cpu()
        for name, views, bound in (("kernels", fused, 2e-4), ("tensor path", tensor_path, 5e-4)):
            assert (views - cpu).abs().max().item() <= bound, (name, size, (views - cpu).abs().max().item())


@pytest.mark.parametrize("recipe", [RECIPE, AFFINE], ids=["sequential", "affine"])
def test_views_at_224_px_are_batch_and_pass_independent_with_two_threads(recipe: Recipe) -> None:
    """At 224 px an image's pixel sums are large enough for torch to split one image's reduction across
    threads, and the CPU path works a few views per pass: neither may change a view's bits."""
    g = torch.Generator().manual_seed(3)
    sizes = [(300, 400)] * 9 + [(333, 500)] * 5
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    params = torch.from_numpy(np.stack([draw_params(recipe, seed=4, key=f"k{i}", view=0, height=h, width=w)
                                        for i, (h, w) in enumerate(sizes)]))
    assert (params[:, COL["jitter"]] > 0).sum() >= 8
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batch = apply_batch(images, params, recipe, 224)
        assert len(images) > max(1, seed_augment.CPU_PASS_BYTES // (3 * 224 * 224 * 4))  # several passes
        for i in range(len(images)):
            assert torch.equal(apply_batch([images[i]], params[i: i + 1], recipe, 224)[0], batch[i]), i
    finally:
        torch.set_num_threads(threads)


def _reference(image: torch.Tensor, row: np.ndarray, size: int, recipe: Recipe) -> torch.Tensor:
    """One view with torchvision's functional ops, in MoCo-v2 order (an independent reference)."""
    h, w = image.shape[-2:]
    x = image.float() / 255
    top, left = round(row[COL["crop_y0"]] * h), round(row[COL["crop_x0"]] * w)
    ch, cw = round(row[COL["crop_h"]] * h), round(row[COL["crop_w"]] * w)
    x = TF.resized_crop(x, top, left, ch, cw, [size, size], antialias=False)
    if row[COL["jitter"]]:
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        factors = [row[COL[c]] for c in ("brightness", "contrast", "saturation", "hue")]
        for k in range(4):
            op = int(row[COL[f"order_{k}"]])
            x = ops[op](x, float(factors[op]))
    if row[COL["grayscale"]]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if row[COL["blur_sigma"]] > 0:
        k = blur_kernel_size(recipe, (size, size))
        s = float(row[COL["blur_sigma"]]) * size / recipe.blur_reference_size
        x = TF.gaussian_blur(x, [k, k], [s, s])
    if row[COL["flip"]]:
        x = TF.horizontal_flip(x)
    return x


@pytest.mark.parametrize("size,src,grey", [(32, (28, 28), False), (48, (60, 45), False), (32, (28, 28), True)])
def test_batch_apply_matches_torchvision_per_image(size: int, src: tuple[int, int], grey: bool) -> None:
    recipe = Recipe(blur_reference_size=32)  # strong blur at small sizes, so the blur path is exercised
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, *src), generator=g, dtype=torch.uint8) for _ in range(64)]
    if grey:  # three equal channels, as Fashion-MNIST's: the hue rotation takes its no-colour path
        images = [im[:1].expand(3, -1, -1).contiguous() for im in images]
    rows = np.stack([draw_params(recipe, seed=2, key=f"k{i}", view=0, height=src[0], width=src[1]) for i in range(64)])
    assert rows[:, COL["blur_sigma"]].astype(bool).any() and rows[:, COL["grayscale"]].astype(bool).any()
    out = apply_batch(images, torch.from_numpy(rows), recipe, size)
    for i in range(64):
        ref = _reference(images[i], rows[i], size, recipe)
        # Flip is folded into the sampling grid here but applied last by torchvision; the blur is
        # symmetric and colour ops are pointwise, so both orders give the same image.
        assert torch.allclose(out[i], ref, atol=2e-5), (i, (out[i] - ref).abs().max().item(), rows[i])


def test_hue_of_grey_images_is_bit_identical_to_the_colour_formula() -> None:
    """A batch of grey images skips the HSV formula; in a batch with one colour image the formula runs for
    every image. A grey image's hue rotation must be the same bits either way."""
    g = torch.Generator().manual_seed(3)
    grey = torch.rand(8, 1, 20, 20, generator=g).expand(-1, 3, -1, -1).contiguous()
    grey[:, :, 0, 0] = 1.0 + 1e-7  # out of range: the clamp must act on both paths alike
    colour = torch.rand(1, 3, 20, 20, generator=g)
    shift = torch.linspace(-0.5, 0.5, 9)
    alone = seed_augment._adjust_hue(grey.clone(), shift[:8])
    mixed = seed_augment._adjust_hue(torch.cat([grey, colour]), shift)[:8]
    assert alone.view(-1).view(torch.int32).equal(mixed.view(-1).view(torch.int32))
    assert torch.equal(alone, grey.clamp(0.0, 1.0))


def test_grayscale_sources_become_three_channels() -> None:
    from seed.shards import Sample, decode_image
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28), mode="L").save(buf, format="PNG")
    image = decode_image(Sample("k", buf.getvalue(), "png", 0, "mem", 0))
    assert image.shape == (3, 28, 28) and torch.equal(image[0], image[2])
    out = apply_batch([image], torch.from_numpy(_rows(1)), RECIPE, 16)
    assert out.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("field,value", [("jitter_p", 1.5), ("crop_scale", (0.5, 0.2)), ("hue", 0.7), ("blur_sigma", (0.0, 1.0)),
                                         ("jitter_mode", "hsv")])
def test_recipe_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        Recipe(**{field: value})


def test_apply_checks_shapes() -> None:
    with pytest.raises(ValueError, match="columns"):
        apply_batch([torch.zeros(3, 8, 8, dtype=torch.uint8)], torch.zeros(1, P - 1), RECIPE, 8)
    with pytest.raises(ValueError, match="2 images but 1"):
        apply_batch([torch.zeros(3, 8, 8, dtype=torch.uint8)] * 2, torch.zeros(1, P), RECIPE, 8)


def test_canvas_crops_equal_per_size_crops() -> None:
    """The CUDA path (one canvas, one sampling call) against the CPU path (one call per source size),
    run here on the CPU: same views up to float rounding of the normalised grid; images shared by
    several views pasted once; chunked when the canvas would be too large."""
    import seed.augment as A

    g = torch.Generator().manual_seed(0)
    sizes = [(375, 500), (333, 640), (500, 375), (28, 28), (640, 333)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    views = [images[i % len(images)] for i in range(12)]                     # each image in 2-3 views
    params = torch.from_numpy(np.concatenate([
        draw_views(RECIPE, seed=1, key=f"k{i}", views=1, height=int(v.shape[-2]), width=int(v.shape[-1]))
        for i, v in enumerate(views)]))
    by_size = A._crops_by_size(views, params, (64, 64))
    canvas = A._crops_on_canvas(views, params, (64, 64))
    assert canvas.shape == by_size.shape == (12, 3, 64, 64)
    assert (canvas - by_size).abs().max() < 1e-4
    two_per_call = A._crops_on_canvas(views, params, (64, 64), canvas_bytes=3 * 640 * 640 * 4 * 2)
    assert (two_per_call - by_size).abs().max() < 1e-4                      # other canvases, same views


def test_canvas_crops_are_those_of_a_canvas_copied_per_view_to_the_bit() -> None:
    """The CUDA path pastes each image once and samples view rank by rank; a canvas with one copy of the
    image per view (the path before, written out here) gives the same bits, whatever the order of views."""
    import seed.augment as A

    g = torch.Generator().manual_seed(1)
    sizes = [(375, 500), (333, 640), (500, 375), (28, 28), (640, 333)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    orders = {"interleaved, 2-3 views each": [i % 5 for i in range(12)],
              "V = 2, consecutive (the teacher stage)": [i // 2 for i in range(10)],
              "one view each (training)": [3, 0, 4, 1, 2],
              "one image, four views, then others": [2, 2, 2, 2, 0, 1]}
    for name, order in orders.items():
        views = [images[i] for i in order]
        params = torch.from_numpy(np.concatenate([
            draw_views(RECIPE, seed=2, key=f"k{i}", views=1, height=int(v.shape[-2]), width=int(v.shape[-1]))
            for i, v in enumerate(views)]))
        H, W = max(int(v.shape[-2]) for v in views), max(int(v.shape[-1]) for v in views)
        canvas = torch.zeros(len(views), 3, H, W, dtype=torch.uint8)
        for b, v in enumerate(views):
            canvas[b, :, : v.shape[-2], : v.shape[-1]] = v
        hw = torch.tensor([[v.shape[-2], v.shape[-1]] for v in views], dtype=torch.float32)
        per_view = A._resized_crop(canvas.float().div_(255.0), hw, (H, W), params.float(), (48, 48))
        assert torch.equal(A._crops_on_canvas(views, params, (48, 48)), per_view), name


def test_a_blur_below_half_a_pixel_is_named_a_no_op() -> None:
    # MoCo-v2's sigma (0.1-2 px of a 224 px view) scaled to 32 px: at most 0.29 px, a 3-tap kernel
    note = blur_note(Recipe(), 32)
    assert note is not None and "0.29 px" in note and "cache.recipe.blur_p: 0" in note
    assert blur_kernel_size(Recipe(), (32, 32)) == 3
    # no note where the blur acts, or where it is off
    assert blur_note(Recipe(), 224) is None and blur_note(Recipe(), 112) is None  # 1.0 px at 112
    assert blur_note(Recipe(blur_p=0.0), 32) is None
    assert blur_note(Recipe(blur_reference_size=32), 32) is None
    # the note's threshold is where a neighbour tap weighs e^-2 of the centre: 0.5 px
    assert blur_note(Recipe(blur_sigma=(0.1, 0.5), blur_reference_size=32), 32) is None
    assert blur_note(Recipe(blur_sigma=(0.1, 0.49), blur_reference_size=32), 32) is not None


# RGB -> YIQ as NTSC defines it, with torchvision's luma weights in the first row (written out again here).
_YIQ_REF = torch.tensor([[0.2989, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)


def _affine_reference(x: torch.Tensor, row: np.ndarray) -> torch.Tensor:
    """``jitter_mode: affine`` on one cropped view ``[3, H, W]``, operation by operation in float64 and
    unclamped, then clamped once: the definition the composed per-view matrices must meet."""
    x = x.double()
    luma = lambda im: torch.einsum("c,chw->hw", _YIQ_REF[0], im)            # noqa: E731
    if row[COL["jitter"]]:
        for k in range(4):
            op = int(row[COL[f"order_{k}"]])
            f = float(row[COL[("brightness", "contrast", "saturation", "hue")[op]]])
            if op == 0:
                x = f * x
            elif op == 1:
                x = f * x + (1 - f) * luma(x).mean()
            elif op == 2:
                x = f * x + (1 - f) * luma(x)
            else:  # rotate the (I, Q) plane by -2 pi f: a positive shift turns red towards yellow, as in HSV
                yiq = torch.einsum("ij,jhw->ihw", _YIQ_REF, x)
                c, s = math.cos(2 * math.pi * f), math.sin(2 * math.pi * f)
                yiq = torch.stack([yiq[0], c * yiq[1] + s * yiq[2], -s * yiq[1] + c * yiq[2]])
                x = torch.einsum("ij,jhw->ihw", torch.linalg.inv(_YIQ_REF), yiq)
    if row[COL["grayscale"]]:
        x = luma(x).expand(3, -1, -1)
    return x.clamp(0, 1).float()


def test_affine_jitter_is_the_operations_composed_with_one_clamp() -> None:
    """Each view's one matrix and offset give what its operations give applied one by one without clamps,
    in its drawn order, on colour images (so saturation and hue act) and on grey ones."""
    recipe = Recipe(jitter_mode="affine", blur_p=0.0)
    g = torch.Generator().manual_seed(5)
    images = [(_smooth(torch.rand(1, 3, 5, 4, generator=g), (40, 30))[0] * 255).to(torch.uint8) for _ in range(60)]
    images += [im[:1].expand(3, -1, -1).contiguous() for im in images[:20]]
    rows = np.stack([draw_params(recipe, seed=6, key=f"k{i}", view=0, height=40, width=30) for i in range(80)])
    jittered = rows[:, COL["jitter"]] > 0.5
    assert jittered.sum() > 40 and (rows[:, COL["grayscale"]] > 0.5).any()
    out = apply_batch(images, torch.from_numpy(rows), recipe, 24)
    plain = rows.copy()
    plain[:, COL["jitter"]] = plain[:, COL["grayscale"]] = 0.0                 # the crop alone
    crops = apply_batch(images, torch.from_numpy(plain), recipe, 24)
    worst = max((out[i] - _affine_reference(crops[i], rows[i])).abs().max().item() for i in range(80))
    assert worst < 2e-6, worst
    # and it is not the sequential recipe: on colour images the two differ, by a few hundredths on average
    gap = (out[:60][torch.from_numpy(jittered[:60])] - apply_batch(images[:60], torch.from_numpy(rows[:60]), RECIPE, 24)
           [torch.from_numpy(jittered[:60])]).abs().mean().item()
    assert 1e-3 < gap < 0.1, gap


def _smooth(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Smooth colour images: a few random colours, bilinearly upsampled."""
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


def test_affine_hue_turns_the_way_torchvision_turns() -> None:
    """A positive hue shift moves each colour's HSV hue up by about the shift, as torchvision's
    ``adjust_hue`` does (the YIQ rotation is not HSV's, so about: within 0.05 of a turn here)."""
    import colorsys

    colours = [(0.8, 0.3, 0.3), (0.3, 0.7, 0.3), (0.3, 0.3, 0.8), (0.6, 0.5, 0.2)]
    for shift in (0.1, -0.1):
        maps, _ = seed_augment.affine_maps(torch.tensor(_hue_only_row(shift))[None])
        for c in colours:
            moved = np.clip(maps[0] @ np.array(c), 0, 1)
            turned = (colorsys.rgb_to_hsv(*moved)[0] - colorsys.rgb_to_hsv(*c)[0] + 0.5) % 1 - 0.5
            reference = TF.adjust_hue(torch.tensor(c).view(3, 1, 1), shift).flatten().tolist()
            expected = (colorsys.rgb_to_hsv(*reference)[0] - colorsys.rgb_to_hsv(*c)[0] + 0.5) % 1 - 0.5
            assert abs(turned - expected) < 0.05 and np.sign(turned) == np.sign(shift), (c, shift, turned, expected)
        # a rotation of the chroma plane keeps the luma
        assert np.allclose(np.array(seed_augment._GRAY) @ maps[0], seed_augment._GRAY, atol=1e-12)


def _hue_only_row(shift: float) -> np.ndarray:
    row = np.zeros(P, dtype=np.float32)
    row[COL["jitter"]], row[COL["hue"]] = 1.0, shift
    row[COL["brightness"]] = row[COL["contrast"]] = row[COL["saturation"]] = 1.0
    row[COL["order_0"]: COL["order_3"] + 1] = (3, 0, 1, 2)
    return row


def test_the_sequential_recipe_keeps_the_fingerprint_of_caches_made_before_the_mode() -> None:
    """Caches made before ``jitter_mode`` recorded a recipe without it: the sequential recipe leaves it out of
    the fingerprint, and a recorded recipe without it reads back as sequential."""
    from seed.config import from_dict

    before = ["blur_p", "blur_reference_size", "blur_sigma", "brightness", "contrast", "crop_ratio", "crop_scale",
              "flip_p", "grayscale_p", "hue", "jitter_p", "saturation", "solarize_p", "solarize_threshold"]
    assert sorted(recipe_fields(RECIPE)) == before
    assert recipe_fields(AFFINE)["jitter_mode"] == "affine"
    for recipe in (RECIPE, AFFINE, Recipe(jitter_mode="affine", hue=0.2)):
        assert from_dict(Recipe, recipe_fields(recipe), "recipe") == recipe


def test_apply_batch_refuses_what_is_not_a_uint8_rgb_image_or_a_size() -> None:
    """A float image (``ToTensor``'s) would be scaled by 1/255 once more on the CPU and cut to integers on the GPU:
    refused, naming the image; so are other channel counts and sizes that are not positive integers. numpy and
    torch integers are sizes."""
    rows = torch.from_numpy(draw_views(Recipe(), seed=0, key="k", views=1, height=9, width=9))
    good = torch.randint(0, 256, (3, 9, 9), dtype=torch.uint8)
    for image, named in ((good.float() / 255, "image 0 must be uint8 [3, h, w], got torch.float32 [3, 9, 9]"),
                         (good[:1], "image 0 must be uint8 [3, h, w], got torch.uint8 [1, 9, 9]")):
        with pytest.raises(ValueError, match=re.escape(named)):
            apply_batch([image], rows, Recipe(), 8)
    with pytest.raises(ValueError, match=r"images must be uint8 \[B, 3, h, w\], got torch.float32"):
        apply_batch(good[None].float(), rows, Recipe(), 8)
    for size in (0, (8, 0), 8.0, "8"):
        with pytest.raises(ValueError, match="size must be a side or .height, width. of integers >= 1"):
            apply_batch([good], rows, Recipe(), size)  # type: ignore[arg-type]
    x = apply_batch([good], rows, Recipe(), 8)
    assert torch.equal(apply_batch([good], rows, Recipe(), np.int64(8)), x)  # type: ignore[arg-type]
    assert torch.equal(apply_batch([good], rows, Recipe(), torch.tensor(8)), x)  # type: ignore[arg-type]
