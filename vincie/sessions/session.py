"""A session (images I0..IK, instructions T0..T{K-1}, optional region masks) and its WebDataset sample form.

Sample layout (one WebDataset sample per session, DESIGN.md "Session data"):
    __key__          stable session id (no dots)
    json             {"schema": 1, "id", "instructions", "num_images", "width", "height", "has_masks", "meta"}
    NNN.img.jpg      image NNN (or .png), NNN = 000..K
    NNN.cur.png      turn NNN's changed region in image NNN (single channel, 0/255)
    NNN.next.png     turn NNN's changed region in image NNN+1
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from vincie.errors import VincieError

SCHEMA_VERSION = 1


class SessionFormatError(VincieError):
    """A sample that cannot be read as a session; `reason` is its skip reason in the training loader
    (vincie.data.order.SKIP_REASONS)."""

    def __init__(self, message: str, reason: str = "bad_json"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Session:
    key: str
    images: list[np.ndarray]  # K+1 x (H, W, 3) uint8
    instructions: list[str]  # K
    cur_masks: list[np.ndarray] | None = None  # K x (H, W) bool: changed region in image i
    next_masks: list[np.ndarray] | None = None  # K x (H, W) bool: changed region in image i+1
    meta: dict = field(default_factory=dict)

    @property
    def turns(self) -> int:
        return len(self.instructions)

    @property
    def has_masks(self) -> bool:
        return self.cur_masks is not None

    @property
    def height(self) -> int:
        return self.images[0].shape[0]

    @property
    def width(self) -> int:
        return self.images[0].shape[1]


def encode_image(array: np.ndarray, fmt: str, jpeg_quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(array).save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    else:
        Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def session_to_sample(session: Session, image_format: str = "jpg", jpeg_quality: int = 95) -> dict[str, bytes | str]:
    """Session -> WebDataset sample dict (member suffix -> bytes), members in a fixed order."""
    if "." in session.key or "/" in session.key:
        raise SessionFormatError(f"session key {session.key!r} must not contain '.' or '/'")
    if len(session.images) != session.turns + 1:
        raise SessionFormatError(f"session {session.key}: {len(session.images)} images for {session.turns} turns")
    header = {
        "schema": SCHEMA_VERSION,
        "id": session.key,
        "instructions": session.instructions,
        "num_images": len(session.images),
        "width": session.width,
        "height": session.height,
        "has_masks": session.has_masks,
        "meta": session.meta,
    }
    sample: dict[str, bytes | str] = {"__key__": session.key,
                                      "json": json.dumps(header, sort_keys=True).encode()}
    for i, image in enumerate(session.images):
        sample[f"{i:03d}.img.{image_format}"] = encode_image(image, image_format, jpeg_quality)
    if session.has_masks:
        for i in range(session.turns):
            sample[f"{i:03d}.cur.png"] = encode_mask(session.cur_masks[i])
            sample[f"{i:03d}.next.png"] = encode_mask(session.next_masks[i])
    return sample


def parse_header(key: str, raw: bytes) -> dict:
    """The sample's json member, checked for the fields every reader relies on."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SessionFormatError(f"session {key}: json member is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SessionFormatError(f"session {key}: json member must be an object")
    if header.get("schema") != SCHEMA_VERSION:
        raise SessionFormatError(f"session {key}: schema version {header.get('schema')!r}, expected {SCHEMA_VERSION}")
    for name, kind in (("instructions", list), ("num_images", int), ("width", int), ("height", int),
                       ("has_masks", bool), ("meta", dict)):
        if not isinstance(header.get(name), kind):
            raise SessionFormatError(f"session {key}: json field '{name}' missing or not {kind.__name__}")
    if header["num_images"] != len(header["instructions"]) + 1 or header["num_images"] < 2:
        raise SessionFormatError(f"session {key}: {header['num_images']} images for "
                                 f"{len(header['instructions'])} instructions (expected one more image)")
    return header


def decode_image(key: str, name: str, data: bytes, mode: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert(mode))
    except Exception as exc:  # PIL raises many types for corrupt data
        raise SessionFormatError(f"session {key}: cannot decode {name} ({type(exc).__name__}: {exc})",
                                 "corrupt_image") from None


def find_member(sample: dict, key: str, stem: str, extensions: tuple[str, ...]) -> tuple[str, bytes]:
    for ext in extensions:
        if f"{stem}.{ext}" in sample:
            return f"{stem}.{ext}", sample[f"{stem}.{ext}"]
    raise SessionFormatError(f"session {key}: missing member {stem}.{extensions[0]}", "missing_member")


def sample_to_session(sample: dict) -> Session:
    """WebDataset sample dict -> Session; raises SessionFormatError naming the key and the bad member."""
    key = sample.get("__key__", "?")
    if "json" not in sample:
        raise SessionFormatError(f"session {key}: missing json member", "missing_member")
    header = parse_header(key, sample["json"])
    images = []
    for i in range(header["num_images"]):
        name, data = find_member(sample, key, f"{i:03d}.img", ("jpg", "png", "jpeg"))
        image = decode_image(key, name, data, "RGB")
        if image.shape[:2] != (header["height"], header["width"]):
            raise SessionFormatError(f"session {key}: {name} is {image.shape[1]}x{image.shape[0]}, "
                                     f"expected {header['width']}x{header['height']}", "corrupt_image")
        images.append(image)
    cur_masks = next_masks = None
    if header["has_masks"]:
        cur_masks, next_masks = [], []
        for i in range(len(header["instructions"])):
            for stem, out in ((f"{i:03d}.cur", cur_masks), (f"{i:03d}.next", next_masks)):
                name, data = find_member(sample, key, stem, ("png",))
                mask = decode_image(key, name, data, "L")
                if mask.shape != (header["height"], header["width"]):
                    raise SessionFormatError(f"session {key}: {name} has shape {mask.shape}, expected "
                                             f"{(header['height'], header['width'])}", "corrupt_image")
                out.append(mask >= 128)
    return Session(key=key, images=images, instructions=list(header["instructions"]), cur_masks=cur_masks,
                   next_masks=next_masks, meta=header["meta"])
