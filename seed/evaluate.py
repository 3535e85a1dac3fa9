"""Frozen-feature evaluation: weighted kNN (FAISS, cosine) and a linear probe.

kNN follows the InstDisc/DINO protocol: cosine similarity on L2-normalised features, the k = 20
nearest training images vote with weight exp(sim / 0.07); 1-NN is reported beside it. The linear
probe is multinomial logistic regression on standardised features (full-batch L-BFGS, fixed
seed). Features are extracted once per encoder, from the whole image resized to the evaluation
resolution (no crop, no flip, no colour change), and reused by both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from seed.augment import COL, P, Recipe, apply_batch
from seed.shards import decode_image, iter_shard

IDENTITY = Recipe()


def identity_params(n: int) -> torch.Tensor:
    """View rows that keep the whole image unchanged (box = image, no flip, no colour change)."""
    rows = torch.zeros(n, P)
    rows[:, COL["crop_w"]] = rows[:, COL["crop_h"]] = 1.0
    rows[:, [COL["brightness"], COL["contrast"], COL["saturation"]]] = 1.0
    rows[:, COL["order_0"]: COL["order_3"] + 1] = torch.arange(4, dtype=torch.float32)
    return rows


def images(urls: Sequence[str], resolution: int, batch_size: int = 512) -> tuple[list[torch.Tensor], np.ndarray]:
    """All decodable images of ``urls`` as float batches in [0, 1] at ``resolution``, and their labels."""
    out, labels, pending = [], [], []
    for url in urls:
        for sample in iter_shard(url):
            try:
                pending.append(decode_image(sample))
            except ValueError:
                continue
            labels.append(sample.label)
            if len(pending) == batch_size:
                out.append(apply_batch(pending, identity_params(len(pending)), IDENTITY, resolution))
                pending = []
    if pending:
        out.append(apply_batch(pending, identity_params(len(pending)), IDENTITY, resolution))
    return out, np.asarray(labels, dtype=np.int64)


@torch.inference_mode()
def extract(fn: Callable[[torch.Tensor], torch.Tensor], batches: Sequence[torch.Tensor], device: torch.device) -> np.ndarray:
    """Features ``[n, d]`` (float32) of every batch through ``fn``."""
    feats = []
    for x in batches:
        x = x.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats.append(fn(x).float().cpu())
    return torch.cat(feats).numpy()


def pixels(batches: Sequence[torch.Tensor]) -> np.ndarray:
    """The raw-pixel baseline's features: flattened images."""
    return torch.cat([x.flatten(1) for x in batches]).numpy()


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclasses.dataclass
class Scores:
    knn: float       # weighted kNN top-1, %
    nn1: float       # 1-NN top-1, %
    linear: float    # linear probe top-1, %

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def knn_predict(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, *, k: int = 20, t: float = 0.07,
                n_classes: int | None = None, center: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(weighted-kNN predictions, 1-NN predictions) by cosine similarity through a FAISS flat index."""
    import faiss

    if center:  # centred features (the raw-pixel baseline): subtract the training mean first
        mean = train.mean(axis=0, keepdims=True)
        train, test = train - mean, test - mean
    xb = np.ascontiguousarray(_normalise(train), dtype=np.float32)
    xq = np.ascontiguousarray(_normalise(test), dtype=np.float32)
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    sims, idx = index.search(xq, k)                                            # n x k
    n_classes = n_classes or int(train_labels.max()) + 1
    votes = np.zeros((len(xq), n_classes))
    weights = np.exp(sims / t)
    np.add.at(votes, (np.arange(len(xq))[:, None], train_labels[idx]), weights)
    return votes.argmax(axis=1), train_labels[idx[:, 0]]


def linear_probe(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, *, seed: int = 0, weight_decay: float = 1e-4,
                 max_iter: int = 200) -> np.ndarray:
    """Predictions of a logistic-regression probe on standardised features (full-batch L-BFGS)."""
    torch.manual_seed(seed)
    mean, std = train.mean(axis=0), train.std(axis=0) + 1e-6
    xtr = torch.from_numpy(((train - mean) / std).astype(np.float32))
    xte = torch.from_numpy(((test - mean) / std).astype(np.float32))
    y = torch.from_numpy(train_labels)
    n_classes = int(train_labels.max()) + 1
    model = nn.Linear(xtr.shape[1], n_classes)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xtr), y) + weight_decay * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return model(xte).argmax(dim=1).numpy()


def score(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray, *,
          center: bool = False, seed: int = 0) -> Scores:
    weighted, nearest = knn_predict(train, train_labels, test, center=center)
    linear = linear_probe(train, train_labels, test, seed=seed)
    acc = lambda pred: float((pred == test_labels).mean() * 100)  # noqa: E731
    return Scores(knn=acc(weighted), nn1=acc(nearest), linear=acc(linear))
