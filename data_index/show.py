"""Contact sheets of sessions: one row per session, images left to right, each turn's instruction under the image
it produces and its region masks drawn as outlines (cur in the source image's colour, next in the result's)."""

from __future__ import annotations

import io
import itertools
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vincie import storage
from vincie.config import StorageConfig
from vincie.sessions.session import Session
from vincie.sessions.shards import iter_sessions

CUR_COLOUR = (255, 255, 255)
NEXT_COLOUR = (255, 40, 40)


def outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) bool boundary pixels of the mask."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def session_row(session: Session, cell: int, font: ImageFont.ImageFont, max_images: int) -> Image.Image:
    images = session.images[:max_images]
    caption_h = 52
    row = Image.new("RGB", (cell * len(images), cell + caption_h), (24, 24, 24))
    draw = ImageDraw.Draw(row)
    for i, array in enumerate(images):
        tile = array.copy()
        if session.has_masks and i < session.turns:
            tile[outline(session.cur_masks[i])] = CUR_COLOUR
        if session.has_masks and i > 0:
            tile[outline(session.next_masks[i - 1])] = NEXT_COLOUR
        scaled = Image.fromarray(tile).resize((cell, cell), Image.NEAREST)
        row.paste(scaled, (i * cell, 0))
        label = "I0 (source)" if i == 0 else f"{i}. " + session.instructions[i - 1]
        lines = textwrap.wrap(label, width=max(10, cell // 7))[:4]
        draw.multiline_text((i * cell + 3, cell + 2), "\n".join(lines), fill=(230, 230, 230), font=font, spacing=1)
    return row


def contact_sheet(sessions: list[Session], cell: int = 128, max_images: int = 7) -> Image.Image:
    font = ImageFont.load_default()
    rows = [session_row(s, cell, font, max_images) for s in sessions]
    width = max(r.width for r in rows)
    sheet = Image.new("RGB", (width, sum(r.height + 6 for r in rows)), (0, 0, 0))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height + 6
    return sheet


def write_contact_sheet(url: str, out: str, count: int, cfg: StorageConfig | None = None, cell: int = 128) -> int:
    sessions = list(itertools.islice(iter_sessions(url, cfg), count))
    buf = io.BytesIO()
    contact_sheet(sessions, cell).save(buf, format="PNG")
    storage.write_bytes_atomic(out, buf.getvalue(), cfg)
    return len(sessions)
