"""The data path: decoding where the model runs, encoded images in the shuffle buffer, clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from seed.augment import apply_batch
from seed.views import Recipe
from seed.data import Example, FreshViews, collate, examples
from seed.decode import Decoder
from seed.errors import SeedError
from seed.shards import Sample, decode_image, image_size, iter_shard
from tests.unit.test_shards import _encoded, foreign_tar

CPU = torch.device("cpu")


def _samples(tmp_path: Path) -> list[Sample]:
    return list(iter_shard(str(foreign_tar(tmp_path / "foreign.tar"))))  # JPEG, PNG, WebP, JPEG


def test_cpu_decoder_is_pil_to_the_bit(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    decoder = Decoder(CPU)
    assert decoder.name == "pil"
    for sample, image in zip(samples, decoder.decode(samples)):
        assert isinstance(image, torch.Tensor) and torch.equal(image, decode_image(sample))


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


def test_a_fresh_example_whose_data_does_not_decode_leaves_its_batch(tmp_path: Path) -> None:
    """Without a cache only the header was checked: such an image is skipped, as everywhere else."""
    samples = _samples(tmp_path)
    params = np.zeros((1, 17), np.float32)
    params[0, 2] = params[0, 3] = 1.0                                        # the whole image
    good = [Example(s, (12, 20), params, -1, 0, {}) for s in samples]
    broken = Example(dataclasses.replace(samples[0], image=_encoded("JPEG", 1)[:40]), (12, 20), params, -1, 0, {})
    batch = collate([good[0], broken, good[1]], Recipe(), 16, Decoder(CPU))
    assert batch.x.shape[0] == 2 and batch.rows.tolist() == [-1, -1]
