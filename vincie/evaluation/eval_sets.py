"""Public multi-turn editing benchmarks, read from a local directory in their published formats (never downloaded).

- MSE-Bench (VINCIE's release; the Hugging Face dataset `leigangqu/MSE-Bench`): parquet files with one row per
  session: `index` (int), `image` (the source, as the `datasets` Image feature: a struct of `bytes` and `path`) and
  `context` (the list of 5 turn prompts). No ground-truth images: it is scored by a VLM judge.
- MagicBrush (test split, as unzipped): `edit_sessions.json` maps each session id to its turns, each
  `{"input": "ID-input.png", "mask": "ID-mask1.png", "output": "ID-output1.png", "instruction": "..."}`, with the
  images under `images/ID/`; 1 to 3 turns per session, turn k+1's input is turn k's ground-truth output.
  `global_descriptions.json` (optional) maps each session id to {image file name: caption}; CLIP-T uses the
  caption of each turn's ground-truth output when it is there.
Both give `EvalSession`s; pass the directory that holds the files (for MagicBrush, its `test/` directory or the
one above it).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from vincie.errors import VincieError


@dataclass
class EvalSession:
    id: str
    source: np.ndarray  # (H, W, 3) uint8 at the benchmark's size
    instructions: list[str]
    targets: list[np.ndarray] | None = None  # ground truth per turn, when the benchmark has it
    captions: list[str] | None = None  # a description of each turn's target (CLIP-T), when it has them

    @property
    def turns(self) -> int:
        return len(self.instructions)


def decode_image(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise VincieError(f"{where}: not a readable image ({exc})") from None


def load_mse_bench(root: str) -> list[EvalSession]:
    import pyarrow.parquet as pq

    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names if f.endswith(".parquet"))
    if not files:
        raise VincieError(f"--data {root}: no parquet files (expected MSE-Bench as published: parquet with columns "
                          "index, image, context, e.g. a local copy of the dataset leigangqu/MSE-Bench)")
    sessions = []
    for path in files:
        table = pq.read_table(path)
        missing = {"index", "image", "context"} - set(table.column_names)
        if missing:
            raise VincieError(f"{path}: no column {', '.join(sorted(missing))} (MSE-Bench rows have index, image, "
                              "context)")
        for row in table.select(["index", "image", "context"]).to_pylist():
            where = f"{path} row index {row['index']}"
            image = row["image"]
            if not isinstance(image, dict) or not image.get("bytes"):
                raise VincieError(f"{where}: image holds no bytes (expected the datasets Image struct)")
            context = row["context"]
            if not context or not all(isinstance(c, str) and c.strip() for c in context):
                raise VincieError(f"{where}: context must be a list of non-empty prompts, got {context!r}")
            sessions.append(EvalSession(str(row["index"]), decode_image(image["bytes"], where), list(context)))
    return sorted(sessions, key=lambda s: (len(s.id), s.id))


def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise VincieError(f"{path}: missing ({what})") from None
    except json.JSONDecodeError as exc:
        raise VincieError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise VincieError(f"{path}: expected a JSON object ({what})")
    return data


def load_magicbrush(root: str) -> list[EvalSession]:
    if not os.path.isfile(os.path.join(root, "edit_sessions.json")) and \
            os.path.isfile(os.path.join(root, "test", "edit_sessions.json")):
        root = os.path.join(root, "test")
    sessions_file = os.path.join(root, "edit_sessions.json")
    if not os.path.isfile(sessions_file):
        raise VincieError(f"--data {root}: no edit_sessions.json (expected MagicBrush's test split as unzipped: "
                          "edit_sessions.json and images/ID/...)")
    table = read_json(sessions_file, "MagicBrush's session id -> list of turns")
    captions_file = os.path.join(root, "global_descriptions.json")
    captions = read_json(captions_file, "session id -> {image: caption}") if os.path.isfile(captions_file) else {}

    def image(session_id: str, name: str) -> np.ndarray:
        path = os.path.join(root, "images", session_id, name)
        try:
            with open(path, "rb") as f:
                return decode_image(f.read(), path)
        except FileNotFoundError:
            raise VincieError(f"{path}: missing (named by {sessions_file}, session {session_id})") from None

    sessions = []
    for session_id, turns in table.items():
        if not isinstance(turns, list) or not turns or not all(
                isinstance(t, dict) and {"input", "output", "instruction"} <= set(t) for t in turns):
            raise VincieError(f"{sessions_file}: session {session_id} must be a list of turns with input, output "
                              "and instruction")
        outputs = [t["output"] for t in turns]
        described = captions.get(session_id, {})
        sessions.append(EvalSession(
            id=str(session_id), source=image(session_id, turns[0]["input"]),
            instructions=[t["instruction"] for t in turns], targets=[image(session_id, o) for o in outputs],
            captions=[described[o] for o in outputs] if all(o in described for o in outputs) else None))
    return sorted(sessions, key=lambda s: (len(s.id), s.id))


LOADERS = {"mse-bench": load_mse_bench, "magicbrush": load_magicbrush}
