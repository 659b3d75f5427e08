"""Session pictures -> pixel tensors at an aspect-ratio bucket: NVIDIA DALI (the training path) and the PIL
reference that the tests and `vincie bench loader` compare it with. Both take the encoded members of one session
and give the same tensors:

    images (N, 3, H, W) float32 in [-1, 1]        masks (M, H, W) bool        (H, W): the session's bucket

Geometry (shared): the bucket is the one nearest the source's aspect ratio (log scale); the source is centre-cropped
to the bucket's aspect ratio (a region in float pixel coordinates, nothing rounded) and that region is resized to
the bucket. Images: linear filter with antialiasing (DALI `INTERP_LINEAR, antialias=True`: a triangle filter
widened by the downscale factor), taps outside the image clamped to its border. Masks: nearest neighbour at pixel
centres, source pixel floor(x0 + (i + 0.5) * scale), then >= 128.

DALI: `fn.decoders.image` with default options (CPU: libjpeg-turbo and libpng; `mixed`: nvJPEG on the GPU) gives
exactly PIL's 8-bit pixels for baseline JPEG (4:4:4 and 4:2:0) and PNG. The reference: PIL decode; PIL's BILINEAR
is the same triangle filter, but at the border PIL renormalises the cut filter where DALI clamps, so the reference
first pads the source by edge replication (wider than the filter). It resizes in 8 bits, as plain PIL code
would, in two passes each rounded to 8 bits, so the two agree within one pixel level (tests). PIL's NEAREST rounds
centres differently, so the reference samples masks by the rule above in numpy.

Bad input: libjpeg-turbo decodes a truncated JPEG without an error (grey rows), so every member is checked for its
end marker first (JPEG EOI, PNG IEND). A DALI pipeline is unusable after a failed run: the decoder drops it and
decodes the members one by one with a fresh one to name the bad member.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vincie.session import SessionFormatError, decode_image

Member = tuple[str, bytes]  # (member suffix, e.g. "001.img.jpg"; encoded bytes)
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in source pixels

PNG_END = b"IEND\xaeB`\x82"


@dataclass
class Frames:
    images: torch.Tensor  # (N, 3, H, W) float32 in [-1, 1]
    masks: torch.Tensor  # (M, H, W) bool


def nearest_bucket(width: int, height: int, shapes: list[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) of the bucket whose aspect ratio is nearest width/height (log scale; first on ties)."""
    return min(shapes, key=lambda s: abs(math.log((s[1] / s[0]) / (width / height))))


def crop_box(width: int, height: int, shape: tuple[int, int]) -> Box:
    """The centred region of a width x height source with the aspect ratio of `shape` (height, width)."""
    aspect = shape[1] / shape[0]
    if width / height > aspect:
        crop = height * aspect
        return ((width - crop) / 2, 0.0, (width + crop) / 2, float(height))
    crop = width / aspect
    return (0.0, (height - crop) / 2, float(width), (height + crop) / 2)


def check_complete(key: str, name: str, data: bytes) -> None:
    """A JPEG must end with its EOI marker and a PNG with its IEND chunk (catches truncation, which
    libjpeg-turbo would decode as grey rows)."""
    ext = name.rsplit(".", 1)[-1]
    if ext in ("jpg", "jpeg"):
        complete = data[:2] == b"\xff\xd8" and b"\xff\xd9" in data[-32:]
    elif ext == "png":
        complete = data[:8] == b"\x89PNG\r\n\x1a\n" and PNG_END in data[-32:]
    else:
        complete = True
    if not complete:
        raise SessionFormatError(f"session {key}: {name} is truncated (no end marker)", "corrupt_image")


class DaliDecoder:
    """DALI pipelines (one for images, one for masks) fed through `external_source`; a CPU pipeline when
    `device_id` is None, else nvJPEG (`mixed`) decoding and GPU resizing on that device, with outputs on it."""

    def __init__(self, shapes: list[tuple[int, int]], threads: int, max_batch: int, device_id: int | None = None):
        self.shapes, self.threads, self.max_batch, self.device_id = shapes, threads, max_batch, device_id
        self.pipes: dict[str, object] = {}

    def pipeline(self, kind: str):
        if kind not in self.pipes:
            self.pipes[kind] = build_pipeline(kind, self.max_batch, self.threads, self.device_id)
        return self.pipes[kind]

    def run(self, kind: str, data: list[bytes], shape: tuple[int, int], box: Box) -> tuple[torch.Tensor, np.ndarray]:
        """-> (pixels: images (N, 3, H, W) float / masks (N, H, W) bool, source shapes (N, 3) as (H, W, C))."""
        pipe = self.pipeline(kind)
        n = len(data)
        pipe.feed_input("encoded", [np.frombuffer(d, np.uint8) for d in data])
        pipe.feed_input("size", [np.array(shape, np.float32)] * n)
        pipe.feed_input("roi_start", [np.array([box[1], box[0]], np.float32)] * n)
        pipe.feed_input("roi_end", [np.array([box[3], box[2]], np.float32)] * n)
        pixels, source = pipe.run()
        out = to_torch(pixels, self.device_id)
        return (out if kind == "image" else out[..., 0]), np.array(source.as_tensor())

    def decode_members(self, key: str, kind: str, members: list[Member], width: int, height: int,
                       shape: tuple[int, int], box: Box) -> torch.Tensor:
        parts = []
        for start in range(0, len(members), self.max_batch):
            chunk = members[start:start + self.max_batch]
            try:
                pixels, source = self.run(kind, [data for _, data in chunk], shape, box)
            except RuntimeError:
                self.pipes.pop(kind, None)
                raise self.name_bad_member(key, kind, chunk, shape, box) from None
            for (name, _), (h, w, _c) in zip(chunk, source):
                if (h, w) != (height, width):
                    raise SessionFormatError(f"session {key}: {name} is {w}x{h}, expected {width}x{height}",
                                             "corrupt_image")
            parts.append(pixels)
        return torch.cat(parts)

    def name_bad_member(self, key: str, kind: str, members: list[Member], shape: tuple[int, int],
                        box: Box) -> SessionFormatError:
        for name, data in members:
            try:
                self.run(kind, [data], shape, box)
            except RuntimeError as exc:
                self.pipes.pop(kind, None)
                return SessionFormatError(f"session {key}: cannot decode {name} (DALI: {dali_error(exc)})",
                                          "corrupt_image")
        return SessionFormatError(f"session {key}: DALI failed on a batch of {len(members)} {kind}s that decode "
                                  "one by one", "corrupt_image")

    def decode(self, key: str, images: list[Member], masks: list[Member], width: int, height: int) -> Frames:
        shape = nearest_bucket(width, height, self.shapes)
        box = crop_box(width, height, shape)
        for name, data in images + masks:
            check_complete(key, name, data)
        pixels = self.decode_members(key, "image", images, width, height, shape, box)
        mask = self.decode_members(key, "mask", masks, width, height, shape, box) if masks else \
            torch.zeros(0, *shape, dtype=torch.bool, device=pixels.device)
        return Frames(pixels, mask)


def dali_error(exc: RuntimeError) -> str:
    """The operator's own message from a DALI pipeline error (the line after 'encountered:')."""
    lines = [line.strip(" :") for line in str(exc).split("encountered:")[-1].splitlines() if line.strip()]
    return lines[0][:200] if lines else "unknown error"


def build_pipeline(kind: str, batch: int, threads: int, device_id: int | None):
    """Synchronous (no prefetch): one run per fed batch, so a run's output is that batch's."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id, exec_async=False,
                  exec_pipelined=False, prefetch_queue_depth=1)
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
        roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
        roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
        source = fn.peek_image_shape(encoded)  # (H, W, C) from the header
        device = "cpu" if device_id is None else "mixed"
        if kind == "image":
            x = fn.decoders.image(encoded, device=device, output_type=types.RGB)  # (H, W, 3) uint8
            x = fn.resize(x, size=size, roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                          interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
            x = fn.crop_mirror_normalize(x, mean=127.5, std=127.5, output_layout="CHW", dtype=types.FLOAT)
        else:
            x = fn.decoders.image(encoded, device=device, output_type=types.GRAY)  # (H, W, 1) uint8
            x = fn.resize(x, size=size, roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                          interp_type=types.INTERP_NN)
            x = x >= 128
        return x, source

    built = pipe()
    built.build()
    return built


def to_torch(batch, device_id: int | None) -> torch.Tensor:
    """A DALI batch of equal-shaped samples -> one tensor (on the pipeline's GPU for a mixed pipeline)."""
    dense = batch.as_tensor()
    if device_id is None:
        return torch.from_numpy(np.array(dense))
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=f"cuda:{device_id}")
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device_id))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The PIL reference (tests and `vincie bench loader`; training never uses it)


def reference_image(key: str, member: Member, shape: tuple[int, int], box: Box, width: int,
                    height: int) -> torch.Tensor:
    name, data = member
    check_complete(key, name, data)
    pixels = decode_image(key, name, data, "RGB")
    if pixels.shape[:2] != (height, width):
        raise SessionFormatError(f"session {key}: {name} is {pixels.shape[1]}x{pixels.shape[0]}, expected "
                                 f"{width}x{height}", "corrupt_image")
    h, w = shape
    pad = math.ceil(max((box[2] - box[0]) / w, (box[3] - box[1]) / h, 1.0)) + 2
    padded = Image.fromarray(np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)), mode="edge"))
    resized = padded.resize((w, h), Image.BILINEAR, box=(box[0] + pad, box[1] + pad, box[2] + pad, box[3] + pad))
    return (torch.from_numpy(np.asarray(resized)).permute(2, 0, 1).float() - 127.5) / 127.5


def reference_mask(key: str, member: Member, shape: tuple[int, int], box: Box, width: int,
                   height: int) -> torch.Tensor:
    name, data = member
    check_complete(key, name, data)
    mask = decode_image(key, name, data, "L")
    if mask.shape != (height, width):
        raise SessionFormatError(f"session {key}: {name} is {mask.shape[1]}x{mask.shape[0]}, expected "
                                 f"{width}x{height}", "corrupt_image")
    h, w = shape
    rows = np.floor(box[1] + (np.arange(h) + 0.5) * (box[3] - box[1]) / h).astype(np.int64).clip(0, height - 1)
    cols = np.floor(box[0] + (np.arange(w) + 0.5) * (box[2] - box[0]) / w).astype(np.int64).clip(0, width - 1)
    return torch.from_numpy(mask[rows][:, cols] >= 128)


class PilDecoder:
    """The reference: PIL decoding and resizing on a pool of `threads` threads (PIL releases the GIL there)."""

    def __init__(self, shapes: list[tuple[int, int]], threads: int):
        self.shapes = shapes
        self.pool = ThreadPoolExecutor(threads)

    def decode(self, key: str, images: list[Member], masks: list[Member], width: int, height: int) -> Frames:
        shape = nearest_bucket(width, height, self.shapes)
        box = crop_box(width, height, shape)
        pixels = list(self.pool.map(lambda m: reference_image(key, m, shape, box, width, height), images))
        mask = list(self.pool.map(lambda m: reference_mask(key, m, shape, box, width, height), masks))
        return Frames(torch.stack(pixels).float(),
                      torch.stack(mask) if mask else torch.zeros(0, *shape, dtype=torch.bool))
