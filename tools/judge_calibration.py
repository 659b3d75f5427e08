"""Calibration of the synth judge (vincie/evaluation/synth_judge.py): the share of turns that pass it, for the
truth, for outputs that must pass (the truth with noise at the tolerance, the truth re-encoded as JPEG at quality
90) and for corruptions of the truth that must fail, beside the same figures under the judge it replaced.

    python tools/judge_calibration.py [--data URL] [--sessions 64]

Without --data it scores the held-out sessions of `make demo` (32x32, split test, seed 0, 5 turns), generated in
memory exactly as `vincie data synth` writes them. tests/test_judge_strict.py runs the same cases.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from data_index.synthetic.world import (COLOURS, DIRECTIONS, SIZE_FRACTIONS, SceneObject, crop, footprint,
                                        generate_session, move_step, quantize, replay_states)
from vincie.config import SynthConfig
from vincie.evaluation.synth_judge import NOISE_STD, TrueTurn, judge_turn, true_turns
from vincie.sessions.session import Session


class Frame:
    """Paints objects into the frames of one session turn, in the session's own camera geometry."""

    def __init__(self, session: Session, k: int):
        meta = session.meta
        self.states = replay_states(meta)
        self.resolution = int(meta["resolution"][0])
        self.margin = int(meta.get("realism", {}).get("jitter_px", 0))
        self.offset = tuple(meta.get("camera_offsets", [(0, 0)] * len(self.states))[k + 1])
        self.transition = meta["transitions"][k]

    def paint(self, image: np.ndarray, obj: SceneObject) -> np.ndarray:
        """image (H, W, 3) uint8 with `obj` drawn on top, shaded as the world renders it."""
        canvas = self.resolution + 2 * self.margin
        inside, shade = footprint(obj, self.resolution, canvas, self.margin)
        inside, shade = (crop(a, self.margin, self.offset, self.resolution) for a in (inside, shade))
        out = image.copy()
        out[inside] = quantize(np.asarray(COLOURS[obj.colour], dtype=np.float32)[None] * shade[inside][:, None])
        return out


def erase(image: np.ndarray, mask: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """image (H, W, 3) uint8 with the pixels of mask (H, W) painted in the median background colour of a ring around
    them (pixels of no object: objects (N, H, W) bool), or of the whole background when the ring has none."""
    ring = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(5))) > 0
    background = ~objects.any(axis=0)
    source = ring & background if (ring & background).any() else background
    out = image.copy()
    out[mask] = np.median(image[source], axis=0).astype(np.uint8) if source.any() else 128
    return out


def untouched(turn: TrueTurn) -> list[int]:
    return [j for j in range(len(turn.names_after)) if j != turn.edited_after]


def colour_name(name: str) -> str:
    return name.split()[0]


def erased_other(session: Session, k: int, turn: TrueTurn) -> list[np.ndarray]:
    return [erase(turn.truth, turn.masks_after[j], turn.masks_after) for j in untouched(turn)]


def recoloured_other(session: Session, k: int, turn: TrueTurn) -> list[np.ndarray]:
    frame, outputs = Frame(session, k), []
    for j in untouched(turn):
        obj = copy.copy(frame.states[k + 1][j])
        free = [c for c in COLOURS if c not in {colour_name(n) for n in turn.names_after}] or \
            [c for c in COLOURS if c != obj.colour]
        obj.colour = free[j % len(free)]
        outputs.append(frame.paint(erase(turn.truth, turn.masks_after[j], turn.masks_after), obj))
    return outputs


def moved_other(session: Session, k: int, turn: TrueTurn) -> list[np.ndarray]:
    """Every untouched object moved by one token (resolution / 8, one 4x4-pixel token at 32x32) in each direction."""
    frame, outputs = Frame(session, k), []
    for j in untouched(turn):
        for dx, dy in DIRECTIONS.values():
            obj = copy.copy(frame.states[k + 1][j])
            obj.cx, obj.cy = obj.cx + dx * move_step(frame.resolution), obj.cy + dy * move_step(frame.resolution)
            outputs.append(frame.paint(erase(turn.truth, turn.masks_after[j], turn.masks_after), obj))
    return outputs


def blurred_other(session: Session, k: int, turn: TrueTurn) -> list[np.ndarray]:
    """Every untouched object blurred away: its pixels replaced by a box blur of the truth over a window twice as
    wide as the object (the object then weighs about a quarter of each pixel)."""
    outputs = []
    for j in untouched(turn):
        rows, cols = np.nonzero(turn.masks_after[j])
        side = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
        blurred = np.asarray(Image.fromarray(turn.truth).filter(ImageFilter.BoxBlur(int(side))))
        out = turn.truth.copy()
        out[turn.masks_after[j]] = blurred[turn.masks_after[j]]
        outputs.append(out)
    return outputs


def grey_patch(session: Session, k: int, turn: TrueTurn) -> list[np.ndarray]:
    """The truth with a 7x7 grey patch on the background, where it touches no object (none when there is no room)."""
    free = ~turn.masks_after.any(axis=0)
    height, width = free.shape
    for y in range(0, height - 6, 3):
        for x in range(0, width - 6, 3):
            if free[y:y + 7, x:x + 7].all():
                out = turn.truth.copy()
                out[y:y + 7, x:x + 7] = 128
                return [out]
    return []


def ghost(session: Session, k: int, turn: TrueTurn) -> list[np.ndarray]:
    return [quantize(0.7 * turn.truth.astype(np.float32) + 0.3 * turn.source.astype(np.float32))]


def input_unchanged(session: Session, k: int, turn: TrueTurn) -> list[np.ndarray]:
    return [turn.source]


def wrong_object(session: Session, k: int, turn: TrueTurn) -> list[np.ndarray]:
    """The turn's edit (move, recolour, resize, remove) applied to each other object of the input instead."""
    frame, outputs = Frame(session, k), []
    kind, before = frame.transition["kind"], frame.states[k]
    if kind == "add":
        return []
    for i, obj in enumerate(before):
        if i == turn.edited_before:
            continue
        image = erase(turn.source, turn.masks_before[i], turn.masks_before)
        changed = copy.copy(obj)
        if kind == "move":
            dx, dy = DIRECTIONS[frame.transition["direction"]]
            changed.cx, changed.cy = obj.cx + dx * frame.transition["pixels"], obj.cy + dy * frame.transition["pixels"]
        elif kind == "recolour":
            changed.colour = frame.transition["colour"]
        elif kind == "resize":
            changed.size = min(max(obj.size + (1 if frame.transition["direction"] == "bigger" else -1), 0),
                               len(SIZE_FRACTIONS) - 1)
        outputs.append(image if kind == "remove" else frame.paint(image, changed))
    return outputs


def wrong_direction(session: Session, k: int, turn: TrueTurn) -> list[np.ndarray]:
    """A move turn's object moved by the same step in each of the three other directions."""
    frame = Frame(session, k)
    if frame.transition["kind"] != "move":
        return []
    obj, step = frame.states[k][turn.edited_before], frame.transition["pixels"]
    image = erase(turn.source, turn.masks_before[turn.edited_before], turn.masks_before)
    outputs = []
    for name, (dx, dy) in DIRECTIONS.items():
        if name != frame.transition["direction"]:
            outputs.append(frame.paint(image, SceneObject(obj.colour, obj.shape, obj.size, obj.cx + dx * step,
                                                          obj.cy + dy * step)))
    return outputs


def truth(session: Session, k: int, turn: TrueTurn) -> list[np.ndarray]:
    return [turn.truth]


def noisy_truth(session: Session, k: int, turn: TrueTurn) -> list[np.ndarray]:
    """The truth plus Gaussian noise of the judge's NOISE_STD per channel (a fixed seed per session and turn)."""
    rng = np.random.default_rng([k, sum(map(ord, session.key))])
    return [quantize(turn.truth.astype(np.float32) + rng.normal(0, NOISE_STD, turn.truth.shape))]


def jpeg(image: np.ndarray, quality: int, subsampling: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
    return np.asarray(Image.open(buffer).convert("RGB"))


def jpeg_90(session: Session, k: int, turn: TrueTurn) -> list[np.ndarray]:
    """The truth as JPEG at quality 90 with full-resolution colour (4:4:4, as vincie writes JPEG sessions)."""
    return [jpeg(turn.truth, 90, subsampling=0)]


def jpeg_90_subsampled(session: Session, k: int, turn: TrueTurn) -> list[np.ndarray]:
    """The truth as JPEG at quality 90 with colour at half resolution (4:2:0, PIL's default)."""
    return [jpeg(turn.truth, 90, subsampling=2)]


Case = Callable[[Session, int, TrueTurn], list[np.ndarray]]
MUST_PASS: dict[str, Case] = {"truth": truth, f"truth + noise std {NOISE_STD:g}": noisy_truth,
                              "truth as JPEG q90 (4:4:4)": jpeg_90}
MUST_FAIL: dict[str, Case] = {"truth, another object erased": erased_other,
                              "truth, another object recoloured": recoloured_other,
                              "truth, another object moved 1 token": moved_other,
                              "truth, another object blurred away": blurred_other,
                              "30 % ghost of the input": ghost, "input unchanged": input_unchanged,
                              "edit applied to the wrong object": wrong_object,
                              "right object moved the wrong way": wrong_direction}
# shown, not required: a grey patch passes where it is within the background tolerance of the background (invisible)
INFORMATIONAL: dict[str, Case] = {"truth, a 7x7 grey patch elsewhere": grey_patch,
                                  "truth as JPEG q90 (4:2:0)": jpeg_90_subsampled}


def old_judge_passes(output: np.ndarray, session: Session, k: int) -> bool:
    """The judge this one replaced, kept here only for the comparison: a pixel matched when its mean absolute RGB
    error was at most 24; >= 80 % of the true changed region (cur | next) and >= 95 % outside it had to match."""
    region = session.cur_masks[k] | session.next_masks[k]
    error = np.abs(output.astype(np.float32) - session.images[k + 1].astype(np.float32)).mean(axis=-1)
    match = error <= 24.0
    return bool(match[region].mean() >= 0.80 and match[~region].mean() >= 0.95)


def demo_held_out(sessions: int) -> list[Session]:
    """The held-out sessions of `make demo` (Makefile: --resolution 32 --split test --seed 0 --turns 5, png)."""
    cfg = SynthConfig(resolution=32, min_turns=5, max_turns=5, image_format="png")
    return [generate_session(cfg, "test", 0, index).session for index in range(sessions)]


def calibrate(sessions: list[Session], cases: dict[str, Case]) -> dict[str, dict]:
    """Per case: how many outputs were tried and how many pass the strict judge and the old one."""
    table = {name: {"cases": 0, "strict": 0, "old": 0} for name in cases}
    for session in sessions:
        for k, turn in enumerate(true_turns(session)):
            for name, case in cases.items():
                for output in case(session, k, turn):
                    row = table[name]
                    row["cases"] += 1
                    row["strict"] += judge_turn(output, turn).success
                    row["old"] += old_judge_passes(output, session, k)
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="held-out sessions (a shard directory); default: the demo's, in memory")
    parser.add_argument("--sessions", type=int, default=64)
    args = parser.parse_args()
    if args.data:
        from vincie.sessions.shards import iter_sessions

        chosen = [s for _, s in zip(range(args.sessions), iter_sessions(args.data))]
    else:
        chosen = demo_held_out(args.sessions)
    table = calibrate(chosen, MUST_PASS | MUST_FAIL | INFORMATIONAL)
    print(f"{len(chosen)} sessions, {sum(s.turns for s in chosen)} turns")
    print(f"| {'output':<36} | {'must':<4} | {'cases':>5} | {'old judge passes':>16} | {'strict judge passes':>19} |")
    print(f"|{'-' * 38}|{'-' * 6}|{'-' * 7}|{'-' * 18}|{'-' * 21}|")
    for name, row in table.items():
        must = "pass" if name in MUST_PASS else "fail" if name in MUST_FAIL else "-"
        cells = [f"{row[j]} ({row[j] / max(row['cases'], 1):.0%})" for j in ("old", "strict")]
        print(f"| {name:<36} | {must:<4} | {row['cases']:>5} | {cells[0]:>16} | {cells[1]:>19} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
