"""The strict judge of the synthetic benchmark: an edited image against the world's exact next state, object by
object.

The synthetic world (data_index/synthetic/world.py) knows every state of a session: its objects (shape, colour,
size, position, drawing order) replay exactly from the session's metadata, and each object's visible pixels render
from them (`true_turns`). For turn k (input I_k, instruction T_k, true next image I_{k+1}) an output passes when

1. **objects**: every object of the true state I_{k+1}, the edited one and the untouched ones, matches the truth
   on its visible pixels but for at most a quarter of them (OBJECT_MATCH_MIN), at least SMALL_OBJECT_OFF, at most
   `most_off` (half of the smallest object): it is there, where it should be, with its colour and size.
   A pixel of an object matches when no channel is off by more than a third of the object's contrast with the
   background around it, within [MIN_OBJECT_TOLERANCE, MAX_OBJECT_TOLERANCE] (`object_tolerances`);
2. **background**: outside the true state's objects and the one-pixel ring around them (where JPEG rings), which
   includes where objects stood in I_k and no longer do, at most `most_off` pixels are off by more than
   BACKGROUND_TOLERANCE in some channel of the error averaged over 3x3 (`local_error`): nothing appears, nothing is
   left behind;
3. **no ghost**: inside the changed region (the edited object's pixels in I_k and in I_{k+1}) the output holds at
   most INPUT_SHARE_MAX of the input: the least-squares a in output - truth = a (input - truth) there. The truth
   has a = 0, the input unchanged a = 1, a blend 0.7 truth + 0.3 input a = 0.3.

The first failed check is the verdict's reason, naming the object and the figure. The thresholds come from the
world's rendering and were fixed before any model was scored; tests/test_judge_strict.py checks them on the
corruptions that must fail and the outputs that must pass, and tools/judge_calibration.py prints the table of
docs/evaluation.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vincie.errors import VincieError
from vincie.sessions.session import Session

NOISE_STD = 8.0  # Gaussian noise per channel (of 255) an output may carry and still pass (tests check it)
# An object's pixel matches when no channel is off by more than a third of the object's contrast: an object blurred
# into its surroundings (off by half its contrast and more) or the 30 % ghost of another state does not match.
# At least 24: 3 standard deviations of the tolerated noise, and above JPEG-90's error at the edges of a small
# low-contrast object (up to 19 at 32x32). At most 40: below the two closest colours of the world's palette at the
# darkest shade (yellow and orange differ by 80 in green, times the shading floor 0.68: 54), so an object of
# another palette colour never matches.
OBJECT_CONTRAST_SHARE = 1 / 3
MIN_OBJECT_TOLERANCE = 24
MAX_OBJECT_TOLERANCE = 40
# Pixels off allowed in one object: a quarter of them (an object moved by one token, resolution / 8, keeps at most
# about 60 % of its footprint, an erased, recoloured or blurred one almost none), at least 3 (JPEG-90 spoils up to
# 3 edge pixels of the smallest objects, 11-12 pixels at 32x32, which a one-token move leaves with under 4 right),
# and at most `TrueTurn.most_off`.
OBJECT_MATCH_MIN = 0.75
SMALL_OBJECT_OFF = 3
# `TrueTurn.most_off`, the most pixels that may be off in the background and in any one object: a quarter of the
# smallest object's bounding box (6 pixels at 32x32, 25 at 64x64), about half of a small diamond's footprint, so
# nothing of object size appears, stays behind or goes missing from a large object; isolated outliers pass.
MOST_OFF_SHARE_OF_SMALLEST = 0.25
# A background pixel is off when a channel of the error, averaged over its 3x3 neighbourhood, exceeds 12: the
# average takes the tolerated noise down to std 2.7 (12 is 4.5 of them) and cancels most of JPEG's ringing along
# the sharp edges of checker and stripe backgrounds (contrast up to 160), while a patch or an object keeps its
# whole offset. The one-pixel ring around the true objects, where JPEG rings at their edges, is not checked.
BACKGROUND_TOLERANCE = 12
# At most a quarter of the input in the changed region: a 30 % ghost reads as 0.30; JPEG-90, which softens the
# edges of small objects towards what surrounds them, reads as up to 0.21 on a small object that grows; noise as
# at most 0.07.
INPUT_SHARE_MAX = 0.25


@dataclass
class TrueTurn:
    """What the world knows about one turn: the input, the true next image and every object of both states."""
    source: np.ndarray  # (H, W, 3) uint8: the input image I_k
    truth: np.ndarray  # (H, W, 3) uint8: the true next image I_{k+1}
    names_before: list[str]  # N: the objects of I_k ("red circle"), in drawing order
    masks_before: np.ndarray  # (N, H, W) bool: each one's visible pixels in I_k
    names_after: list[str]  # M: the objects of I_{k+1}
    masks_after: np.ndarray  # (M, H, W) bool: each one's visible pixels in I_{k+1}
    edited_before: int | None  # index in names_before of the object the instruction edits (None for add)
    edited_after: int | None  # its index in names_after (None for remove)
    most_off: int  # the most pixels that may be off in the background or in one object (MOST_OFF_SHARE_OF_SMALLEST)

    @property
    def changed_region(self) -> np.ndarray:
        """(H, W) bool: the edited object's pixels in I_k and in I_{k+1}."""
        region = np.zeros(self.truth.shape[:2], dtype=bool)
        if self.edited_before is not None:
            region |= self.masks_before[self.edited_before]
        if self.edited_after is not None:
            region |= self.masks_after[self.edited_after]
        return region


@dataclass
class TurnVerdict:
    """One turn's judgement, with the figures of its three checks."""
    success: bool
    reason: str  # empty when the turn passes; else the first failed check, its object and figure
    worst_object: float  # the lowest share of matching pixels over the true state's objects
    background_mismatch: float  # share of the frame that is background (as checked) and off
    input_share: float  # how much of the input the output holds in the changed region (0: none, 1: the input)


def input_share(output: np.ndarray, turn: TrueTurn) -> float:
    """The least-squares a in output - truth = a (source - truth) over the changed region."""
    region = turn.changed_region
    truth = turn.truth[region].astype(np.float64)
    difference = turn.source[region].astype(np.float64) - truth
    energy = float((difference * difference).sum())
    return float(((output[region].astype(np.float64) - truth) * difference).sum() / energy) if energy else 0.0


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """(H, W) bool: mask (H, W) bool and every pixel within `pixels` of it (8-neighbourhood steps)."""
    height, width = mask.shape
    for _ in range(pixels):
        padded = np.pad(mask, 1)
        mask = np.zeros_like(mask)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                mask |= padded[dy:dy + height, dx:dx + width]
    return mask


def local_error(output: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(H, W) float32: the largest channel of |mean of output - truth over each pixel's 3x3 neighbourhood| (the frame's
    edge repeated): what a patch or an object changes, with noise and JPEG's sign-alternating ringing averaged out."""
    difference = np.pad(output.astype(np.float32) - truth.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    height, width = truth.shape[:2]
    mean = sum(difference[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)) / 9
    return np.abs(mean).max(axis=-1)


def background_region(masks_after: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels the background check covers: outside every object of the true state (masks_after,
    (M, H, W) bool) and not touching one, where JPEG rings and a soft edge spills over."""
    return ~grow(masks_after.any(axis=0), 1)


def object_tolerances(turn: TrueTurn) -> np.ndarray:
    """(M,) the pixel tolerance of each object of the true state: OBJECT_CONTRAST_SHARE of its contrast (the median
    over its pixels of the largest channel difference from the median background colour within 2 pixels of it, in
    the truth), clipped to [MIN_OBJECT_TOLERANCE, MAX_OBJECT_TOLERANCE]; the largest when no background touches it."""
    background = ~turn.masks_after.any(axis=0)
    truth = turn.truth.astype(np.int16)
    tolerances = []
    for mask in turn.masks_after:
        ring = grow(mask, 2) & background
        if not ring.any():
            tolerances.append(MAX_OBJECT_TOLERANCE)
            continue
        around = np.median(truth[ring], axis=0)
        contrast = float(np.median(np.abs(truth[mask] - around).max(axis=-1)))
        tolerances.append(min(max(OBJECT_CONTRAST_SHARE * contrast, MIN_OBJECT_TOLERANCE), MAX_OBJECT_TOLERANCE))
    return np.asarray(tolerances, dtype=np.float32)


def judge_turn(output: np.ndarray, turn: TrueTurn) -> TurnVerdict:
    """output (H, W, 3) uint8, the edited image, against the turn's true next state (see the module docstring)."""
    if output.shape != turn.truth.shape:
        raise VincieError(f"an output of shape {output.shape} for a turn whose truth is {turn.truth.shape}")
    reasons = []
    error = np.abs(output.astype(np.int16) - turn.truth.astype(np.int16)).max(axis=-1)  # (H, W)
    shares = []
    for index, (name, mask, tolerance) in enumerate(zip(turn.names_after, turn.masks_after, object_tolerances(turn))):
        pixels = int(mask.sum())
        off = int((error[mask] > tolerance).sum())
        shares.append(1 - off / max(pixels, 1))
        allowed = min(turn.most_off, max(SMALL_OBJECT_OFF, int((1 - OBJECT_MATCH_MIN) * pixels)))
        if off > allowed:
            role = "edited" if index == turn.edited_after else "untouched"
            reasons.append(f"objects: {off} of the {pixels} pixels of the {role} {name} are off (at most {allowed})")
    off_background = background_region(turn.masks_after) & (local_error(output, turn.truth) > BACKGROUND_TOLERANCE)
    if off_background.sum() > turn.most_off:
        vacated = [(int((off_background & mask).sum()), name) for name, mask in zip(turn.names_before,
                                                                                    turn.masks_before)]
        count, name = max(vacated, default=(0, ""))
        where = f", {count} of them where the {name} was in the input" if count else ""
        reasons.append(f"background: {int(off_background.sum())} pixels outside the objects differ "
                       f"({off_background.mean():.1%} of the frame; at most {turn.most_off} pixels){where}")
    share_of_input = input_share(output, turn)
    if share_of_input > INPUT_SHARE_MAX:
        reasons.append(f"ghost: the changed region holds {share_of_input:.0%} of the input "
                       f"(at most {INPUT_SHARE_MAX:.0%})")
    return TurnVerdict(not reasons, reasons[0] if reasons else "", min(shares, default=1.0),
                       float(off_background.mean()), share_of_input)


def true_turns(session: Session) -> list[TrueTurn]:
    """Every turn of a stored synthetic session (or of its first turns) with its objects, replayed from its metadata
    (data_index.synthetic.world.replay_states), their visible pixels rendered at the session's resolution and
    camera offsets."""
    from data_index.synthetic.world import object_px, replay_states, visible_masks

    meta = session.meta
    try:
        states = replay_states(meta)
        resolution, margin = int(meta["resolution"][0]), int(meta.get("realism", {}).get("jitter_px", 0))
        offsets = [tuple(o) for o in meta.get("camera_offsets", [(0, 0)] * len(states))]
    except (KeyError, ValueError, StopIteration, TypeError) as exc:
        raise VincieError(f"session {session.key}: its metadata does not replay as a synthetic world session "
                          f"({type(exc).__name__}: {exc}); the synth judge needs sessions of `vincie data synth`")
    if (session.height, session.width) != (resolution, resolution) or len(session.images) > len(states):
        raise VincieError(f"session {session.key}: {len(session.images)} images of {session.width}x{session.height}, "
                          f"its metadata describes {len(states)} states at {resolution}x{resolution}")
    masks = [visible_masks(objects, resolution, margin, offset)
             for objects, offset in zip(states[:session.turns + 1], offsets)]
    most_off = int(MOST_OFF_SHARE_OF_SMALLEST * object_px(0, resolution) ** 2)
    turns = []
    for k, transition in enumerate(meta["transitions"][:session.turns]):
        before, after = states[k], states[k + 1]
        edited_before = None if transition["kind"] == "add" else \
            next(i for i, o in enumerate(before) if o.name == transition["object"])
        edited_after = len(after) - 1 if transition["kind"] == "add" else \
            None if transition["kind"] == "remove" else edited_before
        turns.append(TrueTurn(session.images[k], session.images[k + 1], [o.name for o in before], masks[k],
                              [o.name for o in after], masks[k + 1], edited_before, edited_after, most_off))
    return turns


def judge_session(session: Session, outputs: list[np.ndarray]) -> list[TurnVerdict]:
    """outputs: the edited images of turns 1..len(outputs), each (H, W, 3) uint8 at the session's resolution."""
    return [judge_turn(output, turn) for output, turn in zip(outputs, true_turns(session))]


def cumulative_success(verdicts: list[list[TurnVerdict]], turns: int) -> list[float]:
    """Share of sessions whose turns 1..k all succeeded, for k = 1..turns."""
    return [float(np.mean([all(v.success for v in session[:k + 1]) for session in verdicts])) for k in range(turns)]
