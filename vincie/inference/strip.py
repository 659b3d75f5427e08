"""A strip PNG of a multi-turn edit: the source, then each turn's result with its instruction underneath."""

from __future__ import annotations

import io
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def strip_png(source: np.ndarray, results: list[np.ndarray], instructions: list[str], cell: int = 160) -> bytes:
    font = ImageFont.load_default()
    caption = 48
    images = [source] + results
    sheet = Image.new("RGB", (cell * len(images), cell + caption), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    for k, image in enumerate(images):
        sheet.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (k * cell, 0))
        label = "source" if k == 0 else f"{k}. {instructions[k - 1]}"
        draw.multiline_text((k * cell + 3, cell + 2), "\n".join(textwrap.wrap(label, cell // 7)[:3]),
                            fill=(230, 230, 230), font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()
