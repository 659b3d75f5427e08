"""Frame differencing: where two frames differ (aligned for camera shift), the offline region masks, and a plain
description of the change (where, how much, what kind) for the offline transition text.

Masks follow the session format (DESIGN.md): `cur` is the changed region in frame i, `next` in frame i+1. From the
difference D alone both would be the union of the two; to split it, each frame's pixels near D are compared with
the background colours around D (a palette, not an inpainted image: on stripes and checks inpainting mixes the
colours), and where the frames differ the one farther from every background colour shows the edit. An edit that
shows in only one of the two frames is an appearance or a disappearance; as in the synthetic world's labels, both
masks are then the region where the object is (appear) or was (disappear)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from vincie.config import IngestConfig

GRID = (("top left", "top", "top right"), ("left", "middle", "right"), ("bottom left", "bottom", "bottom right"))
PALETTE = 256  # background colours kept for the offline masks
HUES = ((15, "red"), (40, "orange"), (70, "yellow"), (160, "green"), (200, "cyan"), (260, "blue"), (290, "purple"),
        (345, "pink"), (361, "red"))


def luma(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) float32 luma (BT.601)."""
    return frame.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)


def shift_image(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[y, x] = image[y + dy, x + dx], edges repeated."""
    height, width = image.shape[:2]
    ys = np.clip(np.arange(height) + dy, 0, height - 1)
    xs = np.clip(np.arange(width) + dx, 0, width - 1)
    return image[ys][:, xs]


def shift_mask(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[y, x] = mask[y + dy, x + dx], False outside."""
    height, width = mask.shape
    out = np.zeros_like(mask)
    out[max(0, -dy):height + min(0, -dy), max(0, -dx):width + min(0, -dx)] = \
        mask[max(0, dy):height + min(0, dy), max(0, dx):width + min(0, dx)]
    return out


def shift_score(a: np.ndarray, b: np.ndarray, dy: int, dx: int, threshold: float) -> float:
    """Mean luma difference of a[y, x] and b[y + dy, x + dx] over the overlap, each pixel's clipped at
    `threshold`: a moving object adds about the same to every candidate shift, so the camera's shift still scores
    lowest, and low-contrast texture still counts."""
    height, width = a.shape
    ys, xs = slice(max(0, -dy), height - max(0, dy)), slice(max(0, -dx), width - max(0, dx))
    yb, xb = slice(max(0, dy), height + min(0, dy)), slice(max(0, dx), width + min(0, dx))
    return float(np.minimum(np.abs(a[ys, xs] - b[yb, xb]), threshold).mean())


def best_shift(a: np.ndarray, b: np.ndarray, centre: tuple[int, int], radius: int, threshold: float) -> tuple[int, int]:
    candidates = [(centre[0] + dy, centre[1] + dx) for dy in range(-radius, radius + 1)
                  for dx in range(-radius, radius + 1)]
    return min(candidates, key=lambda s: (shift_score(a, b, s[0], s[1], threshold), abs(s[0]) + abs(s[1])))


def estimate_shift(a: np.ndarray, b: np.ndarray, max_shift: float, threshold: float = 30.0,
                   coarse_side: int = 96) -> tuple[int, int]:
    """Global translation (dy, dx) with b[y + dy, x + dx] ~ a[y, x], up to `max_shift` of the frame size: the
    integer shift whose overlap differs least (`shift_score`), searched exhaustively on a copy at most
    `coarse_side` pixels wide, then refined at full size. (Phase correlation, tried first, missed 9 of 33 jittered
    synthetic pairs: textures and moving objects pull its peak.) (0, 0) when the best shift lies on the edge of
    the search window: the true optimum may lie beyond it, as for an object that moved farther than `max_shift`
    over a flat background, which no camera shift explains."""
    la, lb = luma(a), luma(b)
    height, width = la.shape
    scale = max(1, int(np.ceil(max(height, width) / coarse_side)))
    small = (max(1, width // scale), max(1, height // scale))
    sa, sb = (cv2.resize(x, small, interpolation=cv2.INTER_AREA) for x in (la, lb))
    radius = max(1, int(max_shift * max(small)))
    dy, dx = best_shift(sa, sb, (0, 0), radius, threshold)
    if max(abs(dy), abs(dx)) == radius:
        return 0, 0
    if scale > 1:
        dy, dx = best_shift(la, lb, (dy * scale, dx * scale), scale, threshold)
    return dy, dx


def outside_range(a: np.ndarray, b: np.ndarray, radius: int) -> np.ndarray:
    """(H, W) int16: how far each pixel of a lies outside the per-channel range of b within `radius` of it (0
    inside), largest channel."""
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    low, high = cv2.erode(b, kernel).astype(np.int16), cv2.dilate(b, kernel).astype(np.int16)
    a = a.astype(np.int16)
    return np.maximum(np.maximum(low - a, a - high), 0).max(axis=-1)


def raw_change(a: np.ndarray, b: np.ndarray, threshold: float, valid: np.ndarray | None = None,
               tolerance: int = 0) -> np.ndarray:
    """(H, W) bool: pixels whose largest channel difference exceeds `threshold`, specks of 1-2 pixels removed
    (sensor and compression noise; a blur or a morphological opening would also eat the thin rims and corners
    of small objects). With `tolerance` t, a pixel is changed only when its colour lies outside the range of the
    other frame's colours within t of it, either way: after a camera shift, colours along edges are misregistered
    and mixed differently (chroma is stored at half resolution, so an odd shift moves every colour edge against
    its 2x2 blocks), but stay between the colours on either side of the edge."""
    if tolerance:
        diff = np.maximum(outside_range(a, b, tolerance), outside_range(b, a, tolerance))
    else:
        diff = np.abs(a.astype(np.int16) - b).max(axis=-1)  # (H, W)
    changed = drop_small(diff > threshold, 3)
    return changed if valid is None else changed & valid


def aligned_change(a: np.ndarray, b: np.ndarray, cfg: IngestConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W) bool changed pixels in a's coordinates and the camera shift (dy, dx) applied to b; (0, 0) and the
    plain difference when no shift is trusted (the rules below)."""
    changed = raw_change(a, b, cfg.pixel_threshold)
    if not cfg.align or not changed.any():
        return changed, (0, 0)
    dy, dx = estimate_shift(a, b, cfg.max_shift, cfg.pixel_threshold)
    if (dy, dx) == (0, 0):
        return changed, (0, 0)
    height, width = a.shape[:2]
    valid = np.zeros((height, width), bool)
    valid[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)] = True
    b_shifted = shift_image(b, dy, dx)
    exact = raw_change(a, b_shifted, cfg.pixel_threshold, valid)
    # the edit: where the frames differ beyond misregistration, in parts thicker than the ringing along edges;
    # its extent: the exact difference connected to it (the tolerant one loses the rim of a grown object)
    seeds = thick_parts(raw_change(a, b_shifted, cfg.pixel_threshold, valid, tolerance=1))
    shifted = parts_touching(exact, seeds if seeds.any() else thick_parts(exact))
    if shifted.sum() > changed.sum():  # ties: low-contrast texture; the masks still need the shift
        return changed, (0, 0)
    # a camera shift moves texture and objects all over the frame; a shift that only explains the change near
    # where the shifted frames still differ is one object's motion (on a flat background every shift is free)
    reach = 2 * max(abs(dy), abs(dx)) + 3
    near = cv2.dilate(shifted.astype(np.uint8), np.ones((reach, reach), np.uint8)) > 0
    if (changed & ~near).sum() < min_edit_pixels(cfg, height, width):
        return changed, (0, 0)
    return shifted, (dy, dx)


def parts_touching(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The connected parts of `mask` (4-connected: a diagonal staircase of ringing along an edge does not join an
    edit) that hold a pixel of `seeds`, kept whole."""
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
    keep = np.zeros(count, bool)
    keep[np.unique(labels[seeds & mask])] = True
    keep[0] = False
    return keep[labels]


def thick_parts(mask: np.ndarray) -> np.ndarray:
    """The connected parts of `mask` that hold a 3x3 square somewhere, kept whole: after a shift, compression
    ringing along edges (colours past either side's, which no tolerance admits) leaves lines one or two pixels
    wide, which would stretch the masks' hull over the frame."""
    return parts_touching(mask, cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0)


def min_edit_pixels(cfg: IngestConfig, height: int, width: int) -> int:
    """Smallest changed area (pixels) that counts as an edit rather than noise."""
    return max(4, int(cfg.min_change * height * width / 4))


def change_map(a: np.ndarray, b: np.ndarray, cfg: IngestConfig) -> np.ndarray:
    return aligned_change(a, b, cfg)[0]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool with enclosed holes filled (flood fill of the background from a padded border)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    return (padded | (1 - flood)).astype(bool)[1:-1, 1:-1]


def drop_small(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(count, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_pixels
    return keep[labels]


def background_palette(a: np.ndarray, b: np.ndarray, hull: np.ndarray, changed: np.ndarray,
                       cfg: IngestConfig) -> np.ndarray:
    """(M, 3) float32, M <= PALETTE: colours of the unchanged pixels in a ring around `hull` (from one pixel
    outside it, whose colour the chroma blur of compression may mix with the edit's, out to `background_ring` of
    the frame size), from both frames (b aligned to a)."""
    height, width = hull.shape
    r = max(2, int(round(cfg.background_ring * max(height, width))))
    inner = cv2.dilate(hull.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    outer = cv2.dilate(hull.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0
    ring = outer & ~inner & ~changed
    if not ring.any():  # the change fills the frame
        ring = ~hull
    colours = np.concatenate([a[ring], b[ring]]).astype(np.float32)
    return colours[::max(1, len(colours) // PALETTE)][:PALETTE]


def palette_distance(frame: np.ndarray, mask: np.ndarray, palette: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """(H, W) float32: at `mask`, the largest channel difference of the pixel from the nearest palette colour
    (how unlike any nearby background colour it is); 0 elsewhere."""
    colours = frame[mask].astype(np.float32)  # (N, 3)
    nearest = np.empty(len(colours), np.float32)
    for s in range(0, len(colours), chunk):  # (chunk, M, 3) at a time
        nearest[s:s + chunk] = np.abs(colours[s:s + chunk, None, :] - palette[None]).max(-1).min(-1)
    out = np.zeros(mask.shape, np.float32)
    out[mask] = nearest
    return out


def drop_rim(mask: np.ndarray, distance: np.ndarray, rim: float) -> np.ndarray:
    """`mask` without the pixels nearer the background than `rim` times the object's typical (75th percentile)
    distance from it: mixed colours at edges (at 64 px a one-pixel rim is a third of a small object's area)."""
    if not mask.any():
        return mask
    return mask & (distance > rim * np.percentile(distance[mask], 75))


@dataclass
class RegionChange:
    cur: np.ndarray  # (H, W) bool, frame i coordinates
    next: np.ndarray  # (H, W) bool, frame i+1 coordinates
    kind: str  # appear | disappear | change (shows in both frames)
    shift: tuple[int, int]  # camera shift (dy, dx) from frame i to i+1
    changed_share: float  # share of the frame that differs
    cur_share: float  # share of the frame where frame i shows the edit (before appear/disappear is decided)
    next_share: float


def region_change(a: np.ndarray, b: np.ndarray, cfg: IngestConfig) -> RegionChange:
    """The offline masks of the change from frame a (i) to frame b (i+1), both (H, W, 3) uint8."""
    changed, (dy, dx) = aligned_change(a, b, cfg)
    height, width = changed.shape
    changed = drop_small(changed, min_edit_pixels(cfg, height, width))
    b_aligned = shift_image(b, dy, dx)
    k = max(3, int(round(cfg.close_px * max(height, width))) | 1)
    region = fill_holes(cv2.morphologyEx(changed.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((k, k), np.uint8)) > 0)
    if not region.any():
        empty = np.zeros_like(region)
        return RegionChange(empty, empty.copy(), "change", (dy, dx), 0.0, 0.0, 0.0)
    # where something may stand in either frame: the convex hull of the change, which also covers the part of a
    # moved object that overlaps itself (there the two frames can differ by less than the threshold)
    hull = np.zeros((height, width), np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(cv2.findNonZero(region.astype(np.uint8))), 1)
    hull = hull.astype(bool) | region
    palette = background_palette(a, b_aligned, hull, changed, cfg)
    dist_a, dist_b = palette_distance(a, hull, palette), palette_distance(b_aligned, hull, palette)  # (H, W)
    # where the frames differ, one of them usually shows the background: the edit is in the frame whose colour
    # is farther from every background colour (a comparison, which stripes and checks do not fool as an
    # inpainted background did); and a frame shows something wherever it is far from all of them (a moved
    # object's overlap with itself, both sides of a recolour)
    cur = hull & ((changed & (dist_a >= dist_b)) | (dist_a > cfg.pixel_threshold))
    nxt = hull & ((changed & (dist_b > dist_a)) | (dist_b > cfg.pixel_threshold))
    cur, nxt = drop_rim(cur, dist_a, cfg.rim), drop_rim(nxt, dist_b, cfg.rim)
    cur_share, next_share = float(cur.mean()), float(nxt.mean())
    kind = "change"
    if cur.sum() < cfg.one_sided * nxt.sum():
        kind, cur, nxt = "appear", region.copy(), region.copy()
    elif nxt.sum() < cfg.one_sided * cur.sum():
        kind, cur, nxt = "disappear", region.copy(), region.copy()
    else:
        cur, nxt = fill_holes(cur), fill_holes(nxt)
    nxt = shift_mask(nxt, -dy, -dx)  # back to frame i+1 coordinates
    return RegionChange(cur, nxt, kind, (dy, dx), float(changed.mean()), cur_share, next_share)


def where(mask: np.ndarray) -> str:
    """The 3x3 grid cell of the mask's centroid: 'top left', 'middle', ..."""
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    return GRID[min(2, int(3 * ys.mean() / height))][min(2, int(3 * xs.mean() / width))]


def colour_name(frame: np.ndarray, mask: np.ndarray) -> str:
    """A basic colour word for the mean colour of `frame` under `mask`."""
    mean = frame[mask].reshape(-1, 3).mean(axis=0).astype(np.float32) / 255.0
    hue, sat, val = cv2.cvtColor(mean.reshape(1, 1, 3), cv2.COLOR_RGB2HSV)[0, 0]
    if val < 0.2:
        return "black"
    if sat < 0.25:
        return "white" if val > 0.8 else "grey"
    return next(name for limit, name in HUES if hue < limit)


def direction(cur: np.ndarray, nxt: np.ndarray) -> str | None:
    """'to the left' / 'to the right' / 'up' / 'down' when the region's centroid moved by more than a quarter of
    its size; None otherwise."""
    (y0, x0), (y1, x1) = (np.argwhere(cur).mean(axis=0), np.argwhere(nxt).mean(axis=0))
    size = np.sqrt(max(cur.sum(), nxt.sum()))
    dy, dx = y1 - y0, x1 - x0
    if max(abs(dy), abs(dx)) < 0.25 * size:
        return None
    if abs(dx) >= abs(dy):
        return "to the right" if dx > 0 else "to the left"
    return "down" if dy > 0 else "up"
