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

from vincie.sessions.session import SessionFormatError, decode_image

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


@dataclass
class Request:
    """One session's encoded pictures, its source size and the bucket it is decoded to."""
    key: str
    images: list[Member]
    masks: list[Member]
    width: int
    height: int
    bucket: tuple[int, int]  # (H, W)

    @property
    def box(self) -> Box:
        return crop_box(self.width, self.height, self.bucket)


class Decoder:
    """The decode interface: `decode_many` (sessions together; a bad one gets its error, the others their frames)
    and `decode` (one session, raising)."""
    shapes: list[tuple[int, int]]

    def decode_many(self, requests: list[Request]) -> list[Frames | SessionFormatError]:
        raise NotImplementedError

    def decode(self, key: str, images: list[Member], masks: list[Member], width: int, height: int) -> Frames:
        bucket = nearest_bucket(width, height, self.shapes)
        (result,) = self.decode_many([Request(key, images, masks, width, height, bucket)])
        if isinstance(result, SessionFormatError):
            raise result
        return result


class DaliDecoder(Decoder):
    """DALI pipelines (one for images, one for masks) fed through `external_source`; a CPU pipeline when
    `device_id` is None, else nvJPEG (`mixed`) decoding and GPU resizing on that device, with outputs on it.
    Several sessions are decoded in one pipeline run (up to `max_batch` pictures): a run costs ~2 ms on this CPU
    before any decoding, as much as a small session's pictures."""

    def __init__(self, shapes: list[tuple[int, int]], threads: int, max_batch: int, device_id: int | None = None):
        self.shapes, self.threads, self.max_batch, self.device_id = shapes, threads, max_batch, device_id
        self.pipes: dict[str, object] = {}

    def pipeline(self, kind: str):
        if kind not in self.pipes:
            self.pipes[kind] = build_pipeline(kind, self.max_batch, self.threads, self.device_id)
        return self.pipes[kind]

    def run(self, kind: str, data: list[bytes], shapes: list[tuple[int, int]],
            boxes: list[Box]) -> tuple[list[torch.Tensor], np.ndarray]:
        """One pipeline run -> (per picture: image (3, H, W) float / mask (H, W) bool, source shapes (N, 3) as
        (H, W, C)). Raises RuntimeError when DALI fails (the pipeline is then dropped)."""
        pipe = self.pipeline(kind)
        pipe.feed_input("encoded", [np.frombuffer(d, np.uint8) for d in data])
        pipe.feed_input("size", [np.array(shape, np.float32) for shape in shapes])
        pipe.feed_input("roi_start", [np.array([box[1], box[0]], np.float32) for box in boxes])
        pipe.feed_input("roi_end", [np.array([box[3], box[2]], np.float32) for box in boxes])
        try:
            pixels, source = pipe.run()
        except RuntimeError:
            self.pipes.pop(kind, None)  # unusable after a failed run
            raise
        out = to_torch(pixels, self.device_id)
        return (out if kind == "image" else [x[..., 0] for x in out]), np.array(source.as_tensor())

    def decode_kind(self, kind: str, requests: list[Request]) -> list[list[torch.Tensor]]:
        """Every picture of one kind of all requests, max_batch per run -> per request its pictures. Raises
        SessionFormatError naming the member when there is one request, or the group, when something is bad."""
        entries = [(k, member) for k, r in enumerate(requests) for member in (r.images if kind == "image" else r.masks)]
        out: list[list[torch.Tensor]] = [[] for _ in requests]
        for start in range(0, len(entries), self.max_batch):
            chunk = entries[start:start + self.max_batch]
            try:
                pixels, source = self.run(kind, [data for _, (_, data) in chunk],
                                          [requests[k].bucket for k, _ in chunk], [requests[k].box for k, _ in chunk])
            except RuntimeError:
                if len(requests) > 1:
                    raise SessionFormatError("a session of the group does not decode", "corrupt_image") from None
                raise self.name_bad_member(requests[0], kind, [m for _, m in chunk]) from None
            for (k, (name, _)), (h, w, _c), x in zip(chunk, source, pixels):
                r = requests[k]
                if (h, w) != (r.height, r.width):
                    raise SessionFormatError(f"session {r.key}: {name} is {w}x{h}, expected {r.width}x{r.height}",
                                             "corrupt_image")
                out[k].append(x)
        return out

    def name_bad_member(self, request: Request, kind: str, members: list[Member]) -> SessionFormatError:
        for name, data in members:
            try:
                self.run(kind, [data], [request.bucket], [request.box])
            except RuntimeError as exc:
                return SessionFormatError(f"session {request.key}: cannot decode {name} (DALI: {dali_error(exc)})",
                                          "corrupt_image")
        return SessionFormatError(f"session {request.key}: DALI failed on {len(members)} {kind}s that decode one "
                                  "by one", "corrupt_image")

    def decode_group(self, requests: list[Request]) -> list[Frames]:
        for r in requests:
            for name, data in r.images + r.masks:
                check_complete(r.key, name, data)
        images, masks = self.decode_kind("image", requests), self.decode_kind("mask", requests)
        return [Frames(torch.stack(i), torch.stack(m) if m else torch.zeros(0, *r.bucket, dtype=torch.bool,
                                                                           device=i[0].device))
                for r, i, m in zip(requests, images, masks)]

    def decode_many(self, requests: list[Request]) -> list[Frames | SessionFormatError]:
        """Sessions decoded together; when one is bad, each is decoded alone, so the others still come back."""
        try:
            return self.decode_group(requests)
        except SessionFormatError as exc:
            if len(requests) == 1:
                return [exc]
            return [self.decode_many([r])[0] for r in requests]


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


def to_torch(batch, device_id: int | None) -> list[torch.Tensor]:
    """A DALI batch -> one tensor per sample (on the pipeline's GPU for a mixed pipeline)."""
    dense = batch.is_dense_tensor()
    parts = [batch.as_tensor()] if dense else [batch[i] for i in range(len(batch))]
    if device_id is None:
        out = [torch.from_numpy(np.array(part)) for part in parts]
    else:
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        out, stream = [], torch.cuda.current_stream(device_id)
        for part in parts:
            out.append(torch.empty(part.shape(), dtype=to_torch_type[part.dtype], device=f"cuda:{device_id}"))
            feed_ndarray(part, out[-1], cuda_stream=stream)
        # the copies are only queued on torch's stream; the pipeline's next run may reuse the buffers they read
        stream.synchronize()
    return list(out[0].unbind(0)) if dense else out


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
    return (torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() - 127.5) / 127.5


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


class PilDecoder(Decoder):
    """The reference: PIL decoding and resizing, every picture of the requests on a pool of `threads` threads
    (PIL releases the GIL there)."""

    def __init__(self, shapes: list[tuple[int, int]], threads: int):
        self.shapes = shapes
        self.pool = ThreadPoolExecutor(threads)

    def decode_many(self, requests: list[Request]) -> list[Frames | SessionFormatError]:
        def work(task):
            r, reference, member = requests[task[0]], task[1], task[2]
            try:
                return reference(r.key, member, r.bucket, r.box, r.width, r.height)
            except SessionFormatError as exc:
                return exc

        tasks = [(k, reference, member) for k, r in enumerate(requests)
                 for reference, members in ((reference_image, r.images), (reference_mask, r.masks))
                 for member in members]
        per_request: list[dict] = [{reference_image: [], reference_mask: []} for _ in requests]
        for (k, reference, _), x in zip(tasks, self.pool.map(work, tasks)):
            per_request[k][reference].append(x)
        results = []
        for r, out in zip(requests, per_request):
            images, masks = out[reference_image], out[reference_mask]
            errors = [x for x in images + masks if isinstance(x, SessionFormatError)]
            results.append(errors[0] if errors else Frames(
                torch.stack(images), torch.stack(masks) if masks else torch.zeros(0, *r.bucket, dtype=torch.bool)))
        return results
