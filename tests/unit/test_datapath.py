"""The data path: decoding where the model runs, encoded images in the shuffle buffer, clear errors."""

from __future__ import annotations

import dataclasses
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import teacher as teacher_stage
from seed.augment import apply_batch
from seed.views import Recipe
from seed.data import Example, FreshViews, _Composed, _jobs, collate, examples
from seed.decode import Decoder
from seed.errors import SeedError
from seed.shards import Sample, decode_image, image_size, iter_shard, shard_lengths
from seed.workers import PackedSamples
from tests.unit.test_shards import _add, _encoded, foreign_tar

CPU = torch.device("cpu")


def _samples(tmp_path: Path) -> list[Sample]:
    return list(iter_shard(str(foreign_tar(tmp_path / "foreign.tar"))))  # JPEG, PNG, WebP, JPEG


def test_cpu_decoder_is_pil_to_the_bit(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    decoder = Decoder(CPU)
    assert decoder.name == "pil"
    for sample, image in zip(samples, decoder.decode(samples)):
        assert isinstance(image, torch.Tensor) and torch.equal(image, decode_image(sample))


def test_the_gpu_decoder_is_chosen_by_decoding_a_jpeg_not_by_importing_it(caplog: pytest.LogCaptureFixture) -> None:
    """A torchvision built without nvJPEG imports ``decode_jpeg`` and fails at the first batch: the probe decodes a
    JPEG on the device and compares it with PIL's pixels, and a decoder that refuses it or gets it wrong is not
    used (said once, naming why). torchvision's own decoder on the CPU passes."""
    from torchvision.io import decode_jpeg

    from seed import decode

    assert decode.nvjpeg_available(CPU) and decode._probed[CPU] is True       # decoded once, remembered

    def refuses(data: torch.Tensor, **kw: object) -> torch.Tensor:
        raise RuntimeError("torchvision not compiled with nvJPEG support")

    def mirrors(data: torch.Tensor, **kw: object) -> torch.Tensor:
        return decode_jpeg(data, **kw).flip(-1)

    def halves(data: torch.Tensor, **kw: object) -> torch.Tensor:
        return decode_jpeg(data, **kw)[..., ::2]

    with caplog.at_level("WARNING", logger="seed.decode"):
        assert decode._decodes_like_pil(CPU, decode_jpeg)
        assert not decode._decodes_like_pil(CPU, refuses)
        assert not decode._decodes_like_pil(CPU, mirrors)
        assert not decode._decodes_like_pil(CPU, halves)
    assert "(torchvision not compiled with nvJPEG support): JPEGs decode with PIL" in caplog.text
    assert "grey levels away from PIL's pixels (at most 16 expected)" in caplog.text
    assert "to shape (3, 16, 12), not (3, 16, 24)" in caplog.text


def test_decoder_reports_undecodable_samples_in_place(tmp_path: Path) -> None:
    good = _samples(tmp_path)[0]
    broken = dataclasses.replace(good, key="broken", image=good.image[:30] if good.image else None)
    missing = dataclasses.replace(good, key="missing", image=None)
    out = Decoder(CPU).decode([good, broken, missing, good])
    assert [type(x).__name__ for x in out] == ["Tensor", "ValueError", "ValueError", "Tensor"]
    assert "does not decode" in str(out[1]) and "no image member" in str(out[2])


def test_image_size_reads_the_header_only(tmp_path: Path) -> None:
    for sample in _samples(tmp_path):
        assert image_size(sample) == tuple(decode_image(sample).shape[-2:]) == (12, 20)
    with pytest.raises(ValueError, match="does not decode"):
        image_size(Sample("x", b"not an image", "jpg", 0, "u", 0))


def test_the_shuffle_buffer_holds_encoded_images(tmp_path: Path) -> None:
    url = str(foreign_tar(tmp_path / "foreign.tar"))
    source = FreshViews(Recipe(), seed=0, n_views=2)
    got = list(examples([url], [0], source, epoch=0, seed=0, shuffle_buffer=2))
    assert sorted(ex.sample.key for ex in got) == sorted(s.key for s in iter_shard(url))
    for ex in got:
        assert isinstance(ex.sample.image, bytes) and ex.size == (12, 20) and ex.params.shape[0] == 2
        assert not any(isinstance(v, torch.Tensor) for v in vars(ex).values())  # nothing decoded yet


def test_collate_is_one_decode_then_one_augment_call_view_major(tmp_path: Path) -> None:
    url = str(foreign_tar(tmp_path / "foreign.tar"))
    recipe = Recipe()
    items = list(examples([url], [0], FreshViews(recipe, seed=3, n_views=2), epoch=1, seed=0, shuffle_buffer=1))
    batch = collate(items, recipe, 16, Decoder(CPU))
    assert batch.x.shape == (8, 3, 16, 16) and batch.n_views == 2
    by_hand = apply_batch([decode_image(it.sample) for v in range(2) for it in items],
                          torch.from_numpy(np.concatenate([np.stack([it.params[v] for it in items]) for v in range(2)])),
                          recipe, 16)
    assert torch.equal(batch.x, by_hand)  # view-major: all first views, then all second views


def test_a_sample_that_changed_since_its_views_were_drawn_is_named(tmp_path: Path) -> None:
    sample = _samples(tmp_path)[0]
    params = np.zeros((1, 17), np.float32)
    other_size = Example(sample, (99, 99), params, 0, 0, {})
    with pytest.raises(SeedError, match=r"sample 'n01440764_10026' decodes to \(12, 20\), its views were drawn for \(99, 99\)"):
        collate([other_size], Recipe(), 16, Decoder(CPU))
    corrupt = Example(dataclasses.replace(sample, image=_encoded("JPEG", 1)[:40]), (12, 20), params, 0, 0, {})
    with pytest.raises(SeedError, match="does not decode any more"):
        collate([corrupt], Recipe(), 16, Decoder(CPU))


def test_a_fresh_example_whose_data_does_not_decode_gives_its_place_to_the_first(tmp_path: Path,
                                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Without a cache only the header was checked: such an image is skipped, as everywhere else, and the batch
    keeps its size (DDP ranks gather equal batches) with the batch's first example again, named in a warning."""
    samples = _samples(tmp_path)
    params = np.zeros((1, 17), np.float32)
    params[0, 2] = params[0, 3] = 1.0                                        # the whole image
    good = [Example(s, (12, 20), params, -1, label, {}) for label, s in enumerate(samples)]
    broken = Example(dataclasses.replace(samples[0], key="broken", image=_encoded("JPEG", 1)[:40]), (12, 20), params,
                     -1, 9, {})
    with caplog.at_level("WARNING", logger="seed.data"):
        batch = collate([good[1], broken, good[2]], Recipe(), 16, Decoder(CPU))
    assert batch.x.shape[0] == 3 and batch.rows.tolist() == [-1, -1, -1] and batch.labels.tolist() == [1, 2, 1]
    assert torch.equal(batch.x[2], batch.x[0]) and not torch.equal(batch.x[1], batch.x[0])
    assert "sample 'broken'" in caplog.text
    with pytest.raises(SeedError, match="no image of a batch of 2 decodes; the first: .*sample 'broken'"):
        collate([broken, broken], Recipe(), 16, Decoder(CPU))


def _tar_with_a_sample_without_image(path: Path, n: int) -> str:
    """``n`` samples; the second has a label and no image (counted in the tar, skipped when read)."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            if i != 1:
                _add(tar, f"s{i}.png", _encoded("PNG", 10 * i, "L"))
            _add(tar, f"s{i}.cls", str(i).encode())
    return str(path)


def test_an_epoch_short_by_skipped_samples_is_completed_from_its_start(tmp_path: Path) -> None:
    """Online sources plan an epoch from the tar's count, which includes samples they skip: the stream is
    completed from the epoch's first examples (up to TOP_UP of it, at least one batch), so every rank makes
    exactly its planned steps; beyond that the epoch stays short (the training loop's error)."""
    url = _tar_with_a_sample_without_image(tmp_path / "s.tar", 6)
    assert shard_lengths([url]) == [6]
    source = FreshViews(Recipe(), seed=0)
    stream = [ex.sample.key for ex in examples([url], [0], source, 0, seed=0, shuffle_buffer=2)]
    assert len(stream) == 5 and "s1" not in stream
    jobs = list(_jobs([url], [0], source, 0, batch_size=3, steps=2, seed=0, shuffle_buffer=2))
    assert [[ex.sample.key for ex in j] for j in jobs] == [stream[:3], stream[3:] + stream[:1]]
    # the same shard planned for 4 steps: 7 examples missing, more than one batch and TOP_UP: not made up
    assert len(list(_jobs([url], [0], source, 0, batch_size=3, steps=4, seed=0, shuffle_buffer=2))) == 1


def test_packed_samples_cross_a_pickle_as_one_tensor_and_decode_the_same(tmp_path: Path) -> None:
    """Workers hand encoded images over as one uint8 tensor (shared memory in a DataLoader); the samples come
    back equal, with or without an image, and decode to the same pixels. Views of one image stay shared."""
    samples = _samples(tmp_path)
    samples += [dataclasses.replace(samples[0], key="empty", image=b""), dataclasses.replace(samples[1], key="none", image=None)]
    packed = PackedSamples.pack(samples)
    assert packed.data.dtype == torch.uint8 and packed.data.numel() == sum(len(s.image or b"") for s in samples)
    assert all(s.image is None for s in packed.samples)
    back = pickle.loads(pickle.dumps(packed)).unpack()
    assert [dataclasses.replace(s, image=None) for s in back] == [dataclasses.replace(s, image=None) for s in samples]
    assert [None if s.image is None else bytes(s.image) for s in back] == [s.image for s in samples]
    assert all(isinstance(s.image, memoryview) for s in back[:-1])                      # views, not copies
    for a, b in zip(Decoder(CPU).decode(samples[:4]), Decoder(CPU).decode(back[:4])):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)

    views = [((s, (12, 20)), np.full(3, v, np.float32), i, v) for i, s in enumerate(samples[:4]) for v in range(2)]
    encoded = pickle.loads(pickle.dumps(teacher_stage._Encoded(3, views)))
    assert encoded.shard == 3 and len(encoded.views) == 8
    assert encoded.views[0][0][0] is encoded.views[1][0][0]                            # V views, one image
    for ((a, size_a), pa, ra, va), ((b, size_b), pb, rb, vb) in zip(views, encoded.views):
        assert bytes(b.image) == a.image and b.key == a.key and size_a == size_b
        assert np.array_equal(pa, pb) and (ra, va) == (rb, vb)

    got = list(examples([str(foreign_tar(tmp_path / "f2.tar"))], [0], FreshViews(Recipe(), seed=0), epoch=0, seed=0,
                        shuffle_buffer=2))
    composed = pickle.loads(pickle.dumps(_Composed(got))).examples
    assert [ex.sample.key for ex in composed] == [ex.sample.key for ex in got]
    assert [bytes(ex.sample.image) for ex in composed] == [ex.sample.image for ex in got]
    assert all(np.array_equal(a.params, b.params) and a.size == b.size for a, b in zip(got, composed))


def test_shards_sorted_by_class_are_named_before_training(fmnist_source: Path) -> None:
    """Real Fashion-MNIST labels: in their own order (already mixed) and shuffled the check says nothing; sorted
    by class, as an image tree written in its own order would give, it names the median shard's share and
    what the shuffle buffer spans."""
    from seed.cache import label_mix, shard_mix_note
    from seed.shards import load_fashion_mnist

    _, labels = load_fashion_mnist(fmnist_source, "train", limit=2000)
    labels = labels.astype(np.int32)
    valid = np.ones((20, 100), dtype=bool)

    def note(rows: np.ndarray, ok: np.ndarray = valid) -> str | None:
        return shard_mix_note(label_mix(rows, ok), 256)

    assert note(labels.reshape(20, 100)) is None
    assert note(np.random.default_rng(0).permutation(labels).reshape(20, 100)) is None
    mixed = label_mix(labels.reshape(20, 100), valid)
    assert mixed is not None and mixed.labels == 10 and 0.1 <= mixed.overall < mixed.median_shard < 0.3
    sorted_note = note(np.sort(labels).reshape(20, 100))
    assert sorted_note is not None and "in the median shard 100% of the images share one label" in sorted_note
    assert "shuffle buffer of 256 images (about 2.6 shards)" in sorted_note
    # many classes in random order: each label is rare everywhere, so nothing to say
    many = np.random.default_rng(1).integers(0, 500, size=(40, 50)).astype(np.int32)
    assert note(many, np.ones_like(many, dtype=bool)) is None
    # two labels only, or none known (-1), or the sorted rows all invalid: nothing to say
    assert note(np.sort(labels % 2).reshape(20, 100)) is None
    assert label_mix(np.full((20, 100), -1, np.int32), valid) is None
    assert label_mix(np.sort(labels).reshape(20, 100), np.zeros_like(valid)) is None


def test_pretraining_tells_class_sorted_shards_from_a_sample_of_their_labels(fmnist_source: Path, tmp_path: Path) -> None:
    """Pre-training has no cache to read the labels from: ``sampled_label_mix`` reads the first images of a few
    shards. Real Fashion-MNIST images in 20 shards of 100: sorted by class it says so (with the shards' true
    size), in the data set's own order it says nothing; a shard that does not read leaves it silent."""
    from seed.cache import shard_mix_note
    from seed.data import sampled_label_mix
    from seed.shards import _png, _write_split, load_fashion_mnist

    images, labels = load_fashion_mnist(fmnist_source, "train", limit=2000)
    for name, order in (("sorted", np.argsort(labels, kind="stable")), ("mixed", np.arange(2000))):
        (tmp_path / name).mkdir()
        _write_split(((f"{name}-{i:05d}", _png(images[i]), "png", int(labels[i])) for i in order), tmp_path / name,
                     "train", 100)
    urls = {name: sorted(str(p) for p in (tmp_path / name).glob("train-*.tar")) for name in ("sorted", "mixed")}
    assert len(urls["sorted"]) == len(urls["mixed"]) == 20
    mix = sampled_label_mix(urls["sorted"], [100] * 20, per_shard=30, shards=8)
    assert mix is not None and mix.sorted_by_class and mix.median_shard == 1.0 and mix.per_shard == 100.0
    note = shard_mix_note(mix, 256, "pretrain.loader.shuffle_buffer")
    assert note is not None and "about 2.6 shards" in note and note.endswith("or raise pretrain.loader.shuffle_buffer")
    mixed = sampled_label_mix(urls["mixed"], [100] * 20, per_shard=30, shards=8)
    assert mixed is not None and not mixed.sorted_by_class and mixed.labels == 10
    (tmp_path / "mixed" / "train-000004.tar").write_bytes(b"not a tar" * 100)
    assert sampled_label_mix(urls["mixed"][:5], [100] * 5, per_shard=30, shards=8) is None  # fewer: all are read
    (tmp_path / "sorted" / "train-000000.tar").write_bytes(b"not a tar" * 100)
    assert sampled_label_mix(urls["sorted"], [100] * 20, per_shard=30, shards=8) is None


def test_pretraining_that_would_draw_the_caches_views_is_warned_of(tmp_path: Path) -> None:
    """Pre-training draws view i of an image from (pretrain.seed + 7, key, i), the cache from (cache.seed, key, i):
    with cache.seed = pretrain.seed + 7 the teacher is pre-trained on the very views the cache embeds (shown
    here on a real sample's rows), and pre-training says so; with other seeds the views differ and it does not."""
    from pipeline.pretrain import pretraining_views, view_overlap_note
    from seed.config import load_config
    from seed.views import draw_views

    sample = _samples(tmp_path)[0]
    h, w = image_size(sample)
    for pretrain_seed, cache_seed in ((0, 7), (3, 10), (0, 0), (0, 8)):
        cfg = load_config(None, [f"pretrain.seed={pretrain_seed}", f"cache.seed={cache_seed}"])
        pretraining = pretraining_views(cfg, 2).load(0, 0)(0, sample)                # what pre-training draws
        cached = draw_views(cfg.cache.recipe, seed=cfg.cache.seed, key=sample.key, views=2, height=h, width=w)
        assert pretraining is not None
        same = np.array_equal(pretraining.params, cached)
        note = view_overlap_note(cfg)
        assert same == (note is not None), (pretrain_seed, cache_seed)
        assert note is None or ("pretrain.seed 0 and cache.seed 7" in note or "pretrain.seed 3 and cache.seed 10" in note)


class _KnownRows:
    """A source whose rows are known without reading its shards, as a cache's are: every sample whose index is
    not a multiple of 7 makes an example (the others as invalid rows). Counts the shards it loads."""

    exact_counts = True

    def __init__(self) -> None:
        self.loaded: list[int] = []

    def rows(self, shard: int) -> np.ndarray:
        return np.array([i for i in range(12) if i % 7])

    def on_damage(self, shard: int) -> None:
        return None

    def load(self, shard: int, epoch: int):  # type: ignore[no-untyped-def]
        self.loaded.append(shard)

        def make(index: int, sample: Sample) -> Example | None:
            return None if index % 7 == 0 else Example(sample, (1, 1), np.zeros((1, 1)), shard * 100 + index, 0, {})

        return make


@pytest.mark.parametrize("buffer", [5, 30])
def test_a_resumed_epoch_fast_forwards_to_the_examples_an_uninterrupted_one_makes(tmp_path: Path, buffer: int) -> None:
    """Skipping the first examples of an epoch (a run resumed inside it) gives exactly the rest of the
    uninterrupted stream, wherever the skip ends (inside a shard, at its end, in the final flush, at the last
    example), and reads only the shards whose examples are still in the shuffle buffer."""
    urls = []
    for s in range(6):
        with tarfile.open(tmp_path / f"s{s}.tar", "w") as tar:
            for i in range(12):
                _add(tar, f"k{s}-{i:02d}.cls", str(i).encode())
        urls.append(str(tmp_path / f"s{s}.tar"))
    order = [3, 0, 5, 1, 4, 2]
    whole = [ex.row for ex in examples(urls, order, _KnownRows(), 2, seed=4, shuffle_buffer=buffer)]
    assert len(whole) == 6 * 10
    for skip in (1, 9, 10, 37, 60 - buffer, 60 - buffer + 2, 59, 60):
        source = _KnownRows()
        rest = [ex.row for ex in examples(urls, order, source, 2, seed=4, shuffle_buffer=buffer, skip=skip)]
        assert rest == whole[skip:], (skip, buffer)
    # late in a small buffer's epoch: the first shards in order left the buffer long before, and are not read
    source = _KnownRows()
    list(examples(urls, order, source, 2, seed=4, shuffle_buffer=5, skip=50))
    assert order[0] not in source.loaded and len(source.loaded) < 6


class _CountingViews(FreshViews):
    """Fresh views that count the shards they load (one load a shard read)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.loaded: list[int] = []

    def load(self, shard: int, epoch: int):  # type: ignore[no-untyped-def]
        self.loaded.append(shard)
        return super().load(shard, epoch)


def test_fresh_views_of_shards_whose_headers_read_fast_forward_a_resumed_epoch(tmp_path: Path, fmnist_source: Path) -> None:
    """Shards from ``seed shards`` record that every image header read, so pre-training's and online SEED's fresh
    views know each shard's examples from its count: a resumed epoch is the rest of the uninterrupted one (the
    views too), reading only the shards the shuffle buffer still holds. Without the record, or with damaged shards
    kept, the counts are an upper bound and the skipped examples are made and dropped; a header that does not read
    in shards recorded as readable is an error naming the sample."""
    from seed.shards import expand_urls, fashion_mnist_to_shards, headers_read

    fashion_mnist_to_shards(str(tmp_path / "fm"), source=str(fmnist_source), per_shard=10, limit=60, progress=False)
    urls = expand_urls(str(tmp_path / "fm" / "train" / "train-{000000..000005}.tar"))
    lengths = shard_lengths(urls)
    assert headers_read(urls) and lengths == [10] * 6
    order = [3, 0, 5, 1, 4, 2]

    def stream(source: FreshViews, skip: int = 0, buffer: int = 5) -> list[tuple[str, bytes]]:
        return [(ex.sample.key, ex.params.tobytes())
                for ex in examples(urls, order, source, 1, seed=4, shuffle_buffer=buffer, skip=skip)]

    whole = stream(FreshViews(Recipe(), seed=0, n_views=2))
    assert len(whole) == 60
    for skip in (1, 17, 50, 55, 59, 60):
        source = _CountingViews.over(urls, lengths, Recipe(), seed=0, n_views=2)
        assert source.exact_counts and stream(source, skip) == whole[skip:], skip
    late = _CountingViews.over(urls, lengths, Recipe(), seed=0, n_views=2)
    stream(late, 50)
    assert order[0] not in late.loaded and len(set(late.loaded)) < 6
    unknown = _CountingViews(Recipe(), seed=0, n_views=2)                 # counts not known exact: every shard read
    assert stream(unknown, 50) == whole[50:] and sorted(set(unknown.loaded)) == list(range(6))
    assert not FreshViews.over(urls, lengths, Recipe(), seed=0, damaged="keep").exact_counts
    assert not FreshViews.over(urls[:1] + [str(tmp_path / "elsewhere.tar")], lengths[:2], Recipe(), seed=0).exact_counts
    from pipeline.pretrain import pretraining_views
    from seed.config import load_config

    assert pretraining_views(load_config(None, []), 2, urls, lengths).exact_counts  # what pre-training trains on
    with pytest.raises(SeedError, match=r"train-000000.tar: sample 5 \('fmnist-train-000005'\) is past the 5 samples "
                                        r"the shards' _info.json counts in it: the shard changed since; write the shards"):
        list(examples(urls[:1], [0], FreshViews(Recipe(), seed=0, counts=[5]), 0, seed=0, shuffle_buffer=1))
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        _add(tar, "k-0.jpg", b"not an image")
    with pytest.raises(SeedError, match=r"bad.tar: sample 0 \('k-0'\) has no readable image header .* the shard changed"):
        list(examples([str(tmp_path / "bad.tar")], [0], FreshViews(Recipe(), seed=0, counts=[1]), 0, seed=0, shuffle_buffer=1))
