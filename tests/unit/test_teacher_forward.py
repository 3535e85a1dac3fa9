"""The teacher stage's forward (``pipeline.teacher.Forward``): eager on the CPU, a replayed CUDA graph on CUDA.

The CUDA tests run wherever a GPU is present (the GPU check runs them); on the CPU they are skipped
with a reason that names them.
"""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from torch import nn

from pipeline.teacher import Forward, embed
from seed.models import Encoder

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: the teacher forward as a CUDA graph (capture, padding, fallback)")


def _teacher(seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    backbone = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    for mod in backbone.modules():  # non-trivial BN statistics: rows would mix if BN used batch statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return Encoder.for_backbone(backbone, nn.Linear(backbone.num_features, 16)).eval()


def _batch(n: int, r: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, r, r, generator=torch.Generator().manual_seed(seed))


def test_on_the_cpu_the_forward_is_embed_to_the_bit() -> None:
    teacher = _teacher()
    forward = Forward(teacher, torch.device("cpu"), batch_size=8, resolution=32, graph=True)
    x = _batch(11)
    assert forward.mode == "eager"
    assert torch.equal(forward(x), embed(teacher, x, torch.device("cpu")))


def _on_cuda(teacher: Encoder) -> Encoder:
    return teacher.to("cuda").to(memory_format=torch.channels_last)


@NEEDS_CUDA
def test_the_graph_gives_the_eager_forward_of_full_batches() -> None:
    device = torch.device("cuda")
    teacher = _on_cuda(_teacher())
    forward = Forward(teacher, device, batch_size=8, resolution=32, graph=True)
    assert forward.mode == "cuda graph"
    x = _batch(8).to(device)
    eager = embed(teacher, x, device)
    assert torch.equal(forward(x), eager)
    # a shorter batch fills the first rows of the captured input: its rows are those of a full batch
    assert torch.equal(forward(x[:3]), eager[:3])
    # one longer than the capture runs in captured-size parts
    y = torch.cat([x, _batch(8, seed=2).to(device)])
    assert torch.equal(forward(y), torch.cat([eager, embed(teacher, y[8:], device)]))
    # replaying again after other inputs changes nothing
    assert torch.equal(forward(x), eager)


class _Syncing(nn.Module):
    """A head that reads a value back to the host in its forward: it cannot be captured."""

    def __init__(self, d: int):
        super().__init__()
        self.linear = nn.Linear(d, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().max()) > 1e9:
            x = x / 2
        return self.linear(x)


@NEEDS_CUDA
def test_a_teacher_that_cannot_be_captured_runs_eagerly_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    device = torch.device("cuda")
    teacher = _teacher()
    teacher.head = _Syncing(teacher.feature_dim)
    teacher = _on_cuda(teacher)
    with caplog.at_level(logging.WARNING, logger="pipeline.teacher"):
        forward = Forward(teacher, device, batch_size=8, resolution=32, graph=True)
    assert forward.mode == "eager"
    assert "cache.cuda_graph" in caplog.text and "runs eagerly" in caplog.text
    x = _batch(5).to(device)
    assert torch.equal(forward(x), embed(teacher, x, device))
