"""Pluggable annotators of a frame pair: transition text and region masks, chosen by config (`ingest.text`,
`ingest.masks`).

Text: `offline` (default, no model) turns the frame difference into a templated sentence (what kind of change,
where, the colour), recorded with quality 0.2; `vlm` asks an OpenAI-compatible endpoint
(data_index/ingest/vlm.py). Masks: `offline` (default) are the frame-difference masks (data_index/ingest/regions.py);
`grounded` runs GroundingDINO + SAM2 from a local weights directory when those packages are installed;
`module.path:ClassName` loads any class with the MaskAnnotator shape below.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Protocol

import numpy as np

from data_index.ingest.regions import RegionChange, colour_name, direction, where
from vincie.config import IngestConfig
from vincie.errors import VincieError

OFFLINE_TEXT_QUALITY = 0.2  # templated from pixels: names no object, only kind, place and colour


class TextAnnotator(Protocol):
    name: str  # recorded in the session metadata (and the index's text_annotator column)
    quality: float  # 0..1, the index's quality column

    def versions(self) -> dict: ...

    def instruction(self, a: np.ndarray, b: np.ndarray, change: RegionChange) -> str: ...


class MaskAnnotator(Protocol):
    name: str

    def masks(self, a: np.ndarray, b: np.ndarray, change: RegionChange, instruction: str) -> tuple[np.ndarray, np.ndarray]:
        """Frames i and i+1, each (H, W, 3) uint8 -> (cur, next), each (H, W) bool."""


def place(mask: np.ndarray) -> str:
    cell = where(mask)
    return "in the middle" if cell == "middle" else f"at the {cell}"


def size_word(mask: np.ndarray) -> str:
    share = mask.mean()
    return "small " if share < 0.01 else "large " if share > 0.1 else ""


class OfflineTextAnnotator:
    """A templated sentence from the frame difference: kind of change, where, colour and rough size."""
    name = "offline-diff/1"
    quality = OFFLINE_TEXT_QUALITY

    def versions(self) -> dict:
        return {}

    def instruction(self, a: np.ndarray, b: np.ndarray, change: RegionChange) -> str:
        cur, nxt = change.cur, change.next
        if not cur.any() and not nxt.any():
            return "keep the picture as it is"
        if change.kind == "appear":
            words = f"{size_word(nxt)}{colour_name(b, nxt)} object"
            return f"add {'an' if words[0] in 'aeiou' else 'a'} {words} {place(nxt)}"
        if change.kind == "disappear":
            return f"remove the {colour_name(a, cur)} object {place(cur)}"
        obj = f"the {colour_name(a, cur)} object {place(cur)}"
        moved = direction(cur, nxt)
        if moved:
            return f"move {obj} {moved}"
        ratio = nxt.sum() / max(1, cur.sum())
        if ratio > 1.25:
            return f"make {obj} bigger"
        if ratio < 0.8:
            return f"make {obj} smaller"
        after = colour_name(b, nxt)
        if after != colour_name(a, cur):
            return f"turn {obj} {after}"
        return f"change {obj}"


class OfflineMaskAnnotator:
    name = "offline-diff/1"

    def masks(self, a, b, change, instruction):
        return change.cur, change.next


class GroundedMaskAnnotator:
    """GroundingDINO boxes for the instruction's phrase, segmented by SAM2, in frame i and in frame i+1, each
    kept where it overlaps the frame difference. Needs the `groundingdino` and `sam2` packages and, in
    `weights_dir`: groundingdino_swint_ogc.pth, GroundingDINO_SwinT_OGC.py, sam2.1_hiera_large.pt and
    sam2.1_hiera_l.yaml. Not run in vincie's tests (no such weights here)."""
    name = "groundingdino+sam2/1"
    FILES = ("groundingdino_swint_ogc.pth", "GroundingDINO_SwinT_OGC.py", "sam2.1_hiera_large.pt", "sam2.1_hiera_l.yaml")

    def __init__(self, weights_dir: str):
        missing = [p for p in ("groundingdino", "sam2") if importlib.util.find_spec(p) is None]
        if missing:
            raise VincieError(f"ingest.masks=grounded needs the Python packages groundingdino and sam2 "
                              f"(missing: {', '.join(missing)}); install them or use ingest.masks=offline")
        absent = [f for f in self.FILES if not os.path.exists(os.path.join(weights_dir, f))]
        if absent:
            raise VincieError(f"ingest.masks_weights_dir {weights_dir}: missing {', '.join(absent)} "
                              f"(expected the GroundingDINO SwinT-OGC and SAM2.1 hiera-large files)")
        from groundingdino.util.inference import load_model
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.dino = load_model(os.path.join(weights_dir, self.FILES[1]), os.path.join(weights_dir, self.FILES[0]))
        self.sam = SAM2ImagePredictor(build_sam2(os.path.join(weights_dir, self.FILES[3]),
                                                 os.path.join(weights_dir, self.FILES[2])))

    def segment(self, frame: np.ndarray, phrase: str, near: np.ndarray) -> np.ndarray:
        import torch
        import torchvision.transforms.functional as TF
        from groundingdino.util.inference import predict

        image = TF.normalize(TF.to_tensor(frame), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        boxes, _, _ = predict(self.dino, image, phrase, box_threshold=0.3, text_threshold=0.25, device="cpu")
        height, width = frame.shape[:2]
        best, best_overlap = np.zeros((height, width), bool), 0
        self.sam.set_image(frame)
        for cx, cy, w, h in boxes.tolist():  # normalised centre boxes
            box = np.asarray([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
            with torch.no_grad():
                masks, _, _ = self.sam.predict(box=box, multimask_output=False)
            mask = masks[0] > 0
            overlap = int((mask & near).sum())
            if overlap > best_overlap:
                best, best_overlap = mask, overlap
        return best

    def masks(self, a, b, change, instruction):
        near = change.cur | change.next
        return self.segment(a, instruction, near), self.segment(b, instruction, near)


def make_mask_annotator(cfg: IngestConfig) -> MaskAnnotator:
    if cfg.masks == "offline":
        return OfflineMaskAnnotator()
    if cfg.masks == "grounded":
        return GroundedMaskAnnotator(cfg.masks_weights_dir)
    module_name, _, class_name = cfg.masks.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise VincieError(f"ingest.masks={cfg.masks}: cannot load the mask annotator ({exc})") from None
    annotator = cls(cfg)
    if not callable(getattr(annotator, "masks", None)) or not isinstance(getattr(annotator, "name", None), str):
        raise VincieError(f"ingest.masks={cfg.masks}: the class needs a `name` string and a "
                          f"`masks(a, b, change, instruction)` method")
    return annotator


def make_text_annotator(cfg: IngestConfig, cache_dir: str, processes: int) -> TextAnnotator:
    if cfg.text == "offline":
        return OfflineTextAnnotator()
    from data_index.ingest.vlm import VLMTextAnnotator

    return VLMTextAnnotator(cfg.vlm, cache_dir, processes)
