"""Decoding images where the model runs: JPEG batches on the GPU (nvJPEG), everything else with PIL.

On CUDA, JPEG bytes go to ``torchvision.io.decode_jpeg(..., device="cuda")`` in one batched call;
PNG, WebP and any JPEG the GPU decoder refuses (CMYK, progressive corner cases) fall back to PIL on
the CPU. On the CPU every image is decoded by ``seed.shards.decode_image`` (PIL, or libpng for plain
8-bit PNGs, the same pixels), so CPU results are unchanged to the bit.

The two decoders may differ by a grey level in places (chroma upsampling and IDCT variants), so
the path is recorded in the cache's preprocessing attributes (``decode``) and a student stage that
decodes differently from its teacher stage says so.

Example:
    >>> import torch
    >>> Decoder(torch.device("cpu")).name
    'pil'
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from seed.shards import Sample, decode_image

JPEG_EXTS = ("jpg", "jpeg")
log = logging.getLogger(__name__)


class Decoder:
    """Decodes samples to uint8 ``[3, h, w]`` tensors (on the GPU for JPEGs when ``device`` is CUDA)."""

    def __init__(self, device: torch.device):
        if device.type == "cuda" and device.index is None:  # one key per GPU for the probe and the stream
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.gpu = device.type == "cuda" and nvjpeg_available(device)

    @property
    def name(self) -> str:
        """``pil``, or ``nvjpeg`` (with PIL for other formats and refused images)."""
        return "nvjpeg" if self.gpu else "pil"

    def decode(self, samples: Sequence[Sample]) -> list[torch.Tensor | ValueError]:
        """One result per sample, in order: the image, or the ``ValueError`` saying why it does not decode."""
        out: list[torch.Tensor | ValueError | None] = [None] * len(samples)
        jpegs = [i for i, s in enumerate(samples) if self.gpu and s.ext in JPEG_EXTS and s.image]
        if jpegs:
            for i, image in zip(jpegs, self._nvjpeg([samples[i].image or b"" for i in jpegs])):
                out[i] = image
        for i, s in enumerate(samples):
            if out[i] is None:
                try:
                    out[i] = decode_image(s)
                except ValueError as exc:
                    out[i] = exc
        return [r if r is not None else ValueError("not decoded") for r in out]

    def _nvjpeg(self, data: list[bytes | memoryview]) -> list[torch.Tensor | None]:
        """Batched GPU decode; images the GPU refuses come back as None (PIL then tries them).

        torchvision's CUDA decoder allocates its outputs on the calling stream and writes them from
        a private stream that does not wait for the calling stream. Called on the default stream,
        it can be handed a block just freed there that queued kernels still read (an activation of
        the teacher's forward, launched from another thread) and overwrite it under them: on an H200
        a few views in 4,096 came out embedding another image (bench/gpu_layouts.py). So decoding
        runs on a stream of its own, whose freed blocks only ever held decoded images, each marked
        as used by the default stream so that no block is reused before the kernels reading it ran.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        # a writable view (seed.workers.PackedSamples) is used in place; bytes are copied (frombuffer needs writable)
        encoded = [torch.frombuffer(b if isinstance(b, memoryview) and not b.readonly else bytearray(b), dtype=torch.uint8)
                   for b in data]
        consumer = torch.cuda.current_stream(self.device)
        stream = _decode_stream(self.device)
        stream.wait_stream(consumer)
        with torch.cuda.stream(stream):
            try:
                images: list[torch.Tensor | None] = list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
            except torch.OutOfMemoryError:  # (a RuntimeError too) not the images' fault: PIL decodes this batch
                _say_once("nvJPEG ran out of GPU memory: a batch decodes with PIL on the CPU (slower); a smaller "
                          "batch or read-ahead leaves it room")
                images = [None] * len(encoded)
            except RuntimeError:  # one bad image fails the batch: try them one by one
                images = []
                for e in encoded:
                    try:
                        images.append(decode_jpeg(e, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        images.append(None)
        consumer.wait_stream(stream)
        for image in images:
            if image is not None:
                image.record_stream(consumer)
        return images


def nvjpeg_available(device: torch.device) -> bool:
    """Whether ``decode_jpeg`` decodes on ``device``: a small JPEG is decoded there once per process and compared
    with PIL's pixels. An import alone would not tell: a torchvision built without nvJPEG imports ``decode_jpeg``
    and fails at the first batch, and every batch would then fall back to PIL while the cache recorded ``nvjpeg``.
    A device that fails the probe leaves JPEGs to PIL, said once."""
    if device not in _probed:
        try:
            from torchvision.io import decode_jpeg
        except ImportError as exc:
            _say_once(f"torchvision.io.decode_jpeg is not available ({exc}): images decode with PIL on the CPU")
            _probed[device] = False
        else:
            _probed[device] = _decodes_like_pil(device, decode_jpeg)
    return _probed[device]


_probed: dict[torch.device, bool] = {}
_PROBE_TOLERANCE = 16  # grey levels: the decoders' chroma upsampling and IDCT differ by one or two; a broken one by more


def _decodes_like_pil(device: torch.device, decode_jpeg: Callable[..., torch.Tensor]) -> bool:
    """Decode a 16 x 24 gradient JPEG with ``decode_jpeg`` on ``device``; True when its pixels are PIL's (within
    :data:`_PROBE_TOLERANCE`). Otherwise says why, once, and returns False."""
    import io

    import numpy as np
    from PIL import Image
    from torchvision.io import ImageReadMode

    y, x = np.mgrid[0:16, 0:24]
    rgb = np.stack([x * 10, y * 15, 255 - x * 5 - y * 5], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    expected = torch.from_numpy(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))).permute(2, 0, 1)
    try:
        if device.type == "cuda":  # once per process: nothing of the probe's overlaps the work that follows
            torch.cuda.synchronize(device)
        got = decode_jpeg(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8), mode=ImageReadMode.RGB,
                          device=device).cpu()
    except RuntimeError as exc:
        _say_once(f"decode_jpeg does not decode on {device} ({exc}): JPEGs decode with PIL on the CPU")
        return False
    if got.shape != expected.shape:
        unlike = f"to shape {tuple(got.shape)}, not {tuple(expected.shape)}"
    elif (diff := int((got.int() - expected.int()).abs().max())) > _PROBE_TOLERANCE:
        unlike = f"{diff} grey levels away from PIL's pixels (at most {_PROBE_TOLERANCE} expected)"
    else:
        return True
    _say_once(f"decode_jpeg on {device} decodes a test image {unlike}: JPEGs decode with PIL on the CPU")
    return False


_said: set[str] = set()


def _say_once(text: str) -> None:
    """Log a warning the first time in this process, not at every batch."""
    if text not in _said:
        _said.add(text)
        log.warning(text)
_streams: dict[torch.device, torch.cuda.Stream] = {}


def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    """One decoding stream per GPU, made on first use."""
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]
