"""The synthetic video world: procedural scenes whose frame-to-frame changes are known exactly.

A scene is a background (flat, gradient or texture) and 1..6 objects (shape, colour, size, position), each of a
different colour so that "the red circle" names one object. A transition edits one object (move, recolour,
resize) or adds or removes one. Every transition yields a templated English instruction that determines it (an
added object has the named size and sits at the centre of the named ninth of the frame) and two exact masks:

    cur  (C_i): where in frame i the edit acts: the edited object's visible pixels in frame i
                (for `add`: where the new object will appear)
    next (N_i): where in frame i+1 the edit's result is: the edited object's visible pixels in frame i+1
                (for `remove`: where the removed object was)

The `undo` transition (not drawn unless synth.transitions names it) refers back to the session's history: it puts
an object back where it was before its last move, gives it back the colour or size it had before its last change
of that, or brings back a removed object as it was (an undone change is not undone again). The current image alone
does not say what to do; the session's earlier images do. It is stored as the edit it makes (move, recolour,
resize, add) with "undo": true.

Objects are shaded (brightness grows along the diagonal from their top-left corner), so a moved or resized object
changes every pixel it covers in either frame. With that, the union C_i | N_i equals the set of pixels that differ
between the two clean frames exactly; the generator rejects any sampled edit for which that does not hold
(e.g. a colour clash with the background), so the property is a guarantee, not an expectation.

Realism (sensor noise, camera jitter) is applied after rendering and never touches the labels: jitter shifts the
camera per frame and the masks are cut with the same shift; noise changes pixel values only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from vincie.config import SynthConfig
from vincie.sessions.session import Session

COLOURS: dict[str, tuple[int, int, int]] = {  # saturated, distinct hues; backgrounds are muted
    "red": (225, 35, 35),
    "green": (40, 185, 55),
    "blue": (40, 75, 225),
    "yellow": (240, 215, 30),
    "purple": (150, 50, 205),
    "orange": (250, 135, 20),
    "cyan": (30, 205, 215),
    "pink": (245, 105, 185),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZE_FRACTIONS = (0.16, 0.23, 0.31)  # object size (bounding box side) / resolution: small, medium, large
SIZE_NAMES = ("small", "medium", "large")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MIN_VISIBLE = 0.5  # every object keeps at least this share of its footprint visible, so instructions stay meaningful
MAX_ATTEMPTS = 200

TEMPLATES = {
    "move": ("move the {obj} {dir_to}", "shift the {obj} {dir_to}", "slide the {obj} {dir_adv}",
             "the {obj} moves {dir_adv}", "push the {obj} a little {dir_to}"),
    "recolour": ("make the {obj} {colour}", "change the colour of the {obj} to {colour}", "paint the {obj} {colour}",
                 "turn the {obj} {colour}", "recolour the {obj} {colour}"),
    "bigger": ("make the {obj} bigger", "enlarge the {obj}", "the {obj} grows", "scale the {obj} up",
               "increase the size of the {obj}"),
    "smaller": ("make the {obj} smaller", "shrink the {obj}", "the {obj} gets smaller", "scale the {obj} down",
                "reduce the size of the {obj}"),
    "add": ("add {a_obj} {where}", "put {a_obj} {where}", "place {a_obj} {where}", "{a_obj} appears {where}",
            "draw {a_obj} {where}"),
    "remove": ("remove the {obj}", "delete the {obj}", "take away the {obj}", "the {obj} disappears",
               "erase the {obj}"),
}
UNDO_TEMPLATES = {  # by the kind of edit the undo makes
    "move": ("put the {obj} back where it was", "move the {obj} back", "return the {obj} to where it was",
             "the {obj} goes back to where it was", "move the {obj} back to its old place"),
    "recolour": ("make the {obj} the colour it was", "change the {obj} back to its old colour",
                 "give the {obj} its old colour back", "the {obj} gets its old colour back",
                 "recolour the {obj} as it was before"),
    "resize": ("make the {obj} its old size", "return the {obj} to its old size", "resize the {obj} back",
               "the {obj} goes back to its old size", "give the {obj} its old size back"),
    "add": ("bring back the {obj}", "put the {obj} back", "the {obj} comes back", "restore the {obj}",
            "bring the {obj} back where it was"),
}
DIR_TO = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
DIR_ADV = {"left": "left", "right": "right", "up": "upwards", "down": "downwards"}
GRID_WHERE = (("in the top left corner", "at the top", "in the top right corner"),
              ("on the left", "in the middle", "on the right"),
              ("in the bottom left corner", "at the bottom", "in the bottom right corner"))


@dataclass
class SceneObject:
    colour: str
    shape: str
    size: int  # index into SIZE_FRACTIONS
    cx: int  # centre, pixels, in the frame's (unjittered) coordinates
    cy: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    background: np.ndarray  # (S, S, 3) float32, S = resolution + 2 * jitter margin
    objects: list[SceneObject]


def object_px(size: int, resolution: int) -> int:
    return max(4, int(round(SIZE_FRACTIONS[size] * resolution)))


def move_step(resolution: int) -> int:
    return resolution // 8


def ninth_centre(index: int, resolution: int) -> int:
    """Pixel coordinate of the centre of the index-th third (0, 1, 2) of the frame along one axis."""
    return int(round((index + 0.5) * resolution / 3))


def muted_colour(rng: np.random.Generator) -> np.ndarray:
    value = rng.uniform(70, 190)
    return np.clip(value + rng.uniform(-22, 22, size=3), 0, 255)


def make_background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """(size, size, 3) float32 in 0..255: muted colours only, so saturated objects always stand out."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    a, b = muted_colour(rng), muted_colour(rng)
    if kind == "flat":
        t = np.zeros_like(xx)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == "checker":
        period = int(rng.integers(4, 12))
        t = (((np.arange(size)[:, None] // period) + (np.arange(size)[None, :] // period)) % 2).astype(np.float32)
    elif kind == "stripes":
        period = int(rng.integers(3, 10))
        axis = np.arange(size)[:, None] if rng.random() < 0.5 else np.arange(size)[None, :]
        t = np.broadcast_to(((axis // period) % 2).astype(np.float32), (size, size))
    elif kind == "noise":
        coarse = rng.random((5, 5)).astype(np.float32)
        idx = np.linspace(0, 4, size)
        i0 = np.floor(idx).astype(int).clip(0, 3)
        f = (idx - i0)[:, None]
        rows = coarse[i0] * (1 - f) + coarse[i0 + 1] * f  # (size, 5)
        g = (idx - i0)[None, :]
        t = rows[:, i0] * (1 - g) + rows[:, i0 + 1] * g
    else:
        raise ValueError(kind)
    return (a[None, None, :] * (1 - t[..., None]) + b[None, None, :] * t[..., None]).astype(np.float32)


def footprint(obj: SceneObject, resolution: int, canvas: int, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """(canvas, canvas) bool mask of the object's pixels and (canvas, canvas) float32 shading factor."""
    side = object_px(obj.size, resolution)
    r = side / 2.0
    cx, cy = obj.cx + margin, obj.cy + margin
    yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if obj.shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif obj.shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif obj.shape == "diamond":
        inside = np.abs(dx) + np.abs(dy) <= r
    elif obj.shape == "triangle":  # apex up
        inside = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    elif obj.shape == "cross":
        arm = r / 3
        inside = ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    else:
        raise ValueError(obj.shape)
    biggest = SIZE_FRACTIONS[-1] * resolution
    shade = 0.68 + 0.32 * ((dx + r) + (dy + r)) / (2 * biggest)
    return inside, shade.astype(np.float32)


def render(scene: Scene, resolution: int, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene -> (canvas, canvas, 3) float32 image and (canvas, canvas) int16 id map (-1 background, else the
    index of the topmost object), over the whole canvas including the jitter margin."""
    canvas = scene.background.shape[0]
    image = scene.background.copy()
    ids = np.full((canvas, canvas), -1, dtype=np.int16)
    for index, obj in enumerate(scene.objects):
        inside, shade = footprint(obj, resolution, canvas, margin)
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)
        image[inside] = colour[None, :] * shade[inside][:, None]
        ids[inside] = index
    return image, ids


def quantize(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def crop(array: np.ndarray, margin: int, offset: tuple[int, int], resolution: int) -> np.ndarray:
    x0, y0 = margin + offset[0], margin + offset[1]
    return array[y0:y0 + resolution, x0:x0 + resolution]


def fits(obj: SceneObject, resolution: int) -> bool:
    half = object_px(obj.size, resolution) / 2.0
    return half <= obj.cx <= resolution - half and half <= obj.cy <= resolution - half


def visible_enough(scene: Scene, ids: np.ndarray, resolution: int, margin: int) -> bool:
    canvas = ids.shape[0]
    for index, obj in enumerate(scene.objects):
        inside, _ = footprint(obj, resolution, canvas, margin)
        if (ids == index).sum() < MIN_VISIBLE * inside.sum():
            return False
    return True


def random_object(rng: np.random.Generator, resolution: int, colour: str) -> SceneObject:
    size = int(rng.integers(0, len(SIZE_FRACTIONS)))
    half = int(np.ceil(object_px(size, resolution) / 2))
    cx = int(rng.integers(half, resolution - half + 1))
    cy = int(rng.integers(half, resolution - half + 1))
    return SceneObject(colour=colour, shape=str(rng.choice(SHAPES)), size=size, cx=cx, cy=cy)


def free_colours(scene: Scene) -> list[str]:
    used = {o.colour for o in scene.objects}
    return [c for c in COLOURS if c not in used]


def random_scene(rng: np.random.Generator, cfg: SynthConfig, margin: int) -> Scene:
    canvas = cfg.resolution + 2 * margin
    for _ in range(MAX_ATTEMPTS):
        background = make_background(rng, canvas, str(rng.choice(cfg.backgrounds)))
        count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        colours = rng.choice(list(COLOURS), size=count, replace=False)
        scene = Scene(background, [random_object(rng, cfg.resolution, str(c)) for c in colours])
        _, ids = render(scene, cfg.resolution, margin)
        if visible_enough(scene, ids, cfg.resolution, margin):
            return scene
    raise RuntimeError("could not place objects; lower synth.max_objects or raise synth.resolution")


@dataclass
class Edit:
    kind: str  # move | recolour | resize | add | remove
    target: int  # index of the edited object in the scene before the edit (for add: its index after)
    after: Scene
    instruction: str
    params: dict


@dataclass
class History:
    """What the session's earlier states know and its current image does not: for each object of the scene (in its
    order) the position, colour and size it had before its last change of each, and the objects removed so far (the
    last one of each name)."""
    earlier: list[dict]  # per object: {"position": (cx, cy), "colour": str, "size": int}, the changed ones only
    removed: list[SceneObject]

    @classmethod
    def of(cls, scene: Scene) -> "History":
        return cls([{} for _ in scene.objects], [])

    def record(self, before: Scene, edit: Edit) -> None:
        """Takes note of `edit`, made on the scene `before`."""
        if edit.kind == "add":
            self.earlier.append({})
            self.removed = [o for o in self.removed if o.name != edit.params["object"]]
            return
        obj = before.objects[edit.target]
        if edit.kind == "remove":
            self.removed = [o for o in self.removed if o.name != obj.name] + [copy.deepcopy(obj)]
            del self.earlier[edit.target]
        else:
            attribute = {"move": "position", "recolour": "colour", "resize": "size"}[edit.kind]
            if edit.params.get("undo"):  # undone: nothing earlier to go back to ("back" twice is not a redo)
                del self.earlier[edit.target][attribute]
            else:
                self.earlier[edit.target][attribute] = \
                    {"position": (obj.cx, obj.cy), "colour": obj.colour, "size": obj.size}[attribute]


def propose_undo(rng: np.random.Generator, scene: Scene, history: History, resolution: int) -> Edit | None:
    """One random undo (see the module docstring), or None when nothing can be undone."""
    used, n = {o.colour for o in scene.objects}, len(scene.objects)
    options = [(index, attribute) for index, earlier in enumerate(history.earlier) for attribute in earlier
               if attribute != "colour" or earlier["colour"] not in used]
    options += [(None, obj) for obj in history.removed if obj.colour not in used and n < 6]
    if not options:
        return None
    index, what = options[int(rng.integers(0, len(options)))]
    after = Scene(scene.background, copy.deepcopy(scene.objects))
    if index is None:  # a removed object back as it was, drawn on top
        after.objects.append(copy.deepcopy(what))
        text = str(rng.choice(UNDO_TEMPLATES["add"])).format(obj=what.name)
        return Edit("add", n, after, text, {"object": what.name, "size": SIZE_NAMES[what.size],
                                            "centre": [what.cx, what.cy], "undo": True})
    obj, earlier = after.objects[index], history.earlier[index][what]
    name = obj.name
    if what == "position":
        step = move_step(resolution)
        direction = next(d for d, (dx, dy) in DIRECTIONS.items()
                         if (obj.cx + dx * step, obj.cy + dy * step) == tuple(earlier))
        obj.cx, obj.cy = earlier
        kind, params = "move", {"direction": direction, "pixels": step}
    elif what == "colour":
        obj.colour = earlier
        kind, params = "recolour", {"colour": earlier}
    else:
        kind, params = "resize", {"direction": "bigger" if earlier > obj.size else "smaller"}
        obj.size = earlier
    if not fits(obj, resolution):
        return None
    text = str(rng.choice(UNDO_TEMPLATES[kind])).format(obj=name)
    return Edit(kind, index, after, text, {"object": name, **params, "undo": True})


def propose_edit(rng: np.random.Generator, scene: Scene, kind: str, resolution: int,
                 history: History | None = None) -> Edit | None:
    """One random edit of `kind`, or None when this kind cannot apply to the scene (`history`: for undo)."""
    if kind == "undo":
        return propose_undo(rng, scene, history, resolution)
    after = Scene(scene.background, copy.deepcopy(scene.objects))
    n = len(scene.objects)
    if kind == "add":
        colours = free_colours(scene)
        if not colours or n >= 6:
            return None
        # the instruction determines the edit (the exact judge compares with the one true image): the named size,
        # centred in the named ninth of the frame
        row, col = (int(v) for v in rng.integers(0, 3, size=2))
        obj = SceneObject(colour=str(rng.choice(colours)), shape=str(rng.choice(SHAPES)),
                          size=int(rng.integers(0, len(SIZE_FRACTIONS))), cx=ninth_centre(col, resolution),
                          cy=ninth_centre(row, resolution))
        after.objects.append(obj)
        where = GRID_WHERE[row][col]
        text = str(rng.choice(TEMPLATES["add"])).format(a_obj=f"a {SIZE_NAMES[obj.size]} {obj.name}", where=where)
        return Edit("add", n, after, text, {"object": obj.name, "size": SIZE_NAMES[obj.size], "where": where})
    if n == 0 or (kind == "remove" and n < 2):
        return None
    target = int(rng.integers(0, n))
    obj = after.objects[target]
    name = obj.name
    if kind == "remove":
        del after.objects[target]
        text = str(rng.choice(TEMPLATES["remove"])).format(obj=name)
        return Edit("remove", target, after, text, {"object": name})
    if kind == "move":
        direction = str(rng.choice(list(DIRECTIONS)))
        step = move_step(resolution)
        obj.cx += DIRECTIONS[direction][0] * step
        obj.cy += DIRECTIONS[direction][1] * step
        if not fits(obj, resolution):
            return None
        text = str(rng.choice(TEMPLATES["move"])).format(obj=name, dir_to=DIR_TO[direction],
                                                        dir_adv=DIR_ADV[direction])
        return Edit("move", target, after, text, {"object": name, "direction": direction, "pixels": step})
    if kind == "recolour":
        colours = free_colours(scene)
        if not colours:
            return None
        obj.colour = str(rng.choice(colours))
        text = str(rng.choice(TEMPLATES["recolour"])).format(obj=name, colour=obj.colour)
        return Edit("recolour", target, after, text, {"object": name, "colour": obj.colour})
    if kind == "resize":
        grow = bool(rng.random() < 0.5)
        obj.size += 1 if grow else -1
        if not 0 <= obj.size < len(SIZE_FRACTIONS) or not fits(obj, resolution):
            return None
        which = "bigger" if grow else "smaller"
        text = str(rng.choice(TEMPLATES[which])).format(obj=name)
        return Edit("resize", target, after, text, {"object": name, "direction": which})
    raise ValueError(kind)


def edit_masks(edit: Edit, ids_before: np.ndarray, ids_after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact region masks from the id maps: (cur, next), each (H, W) bool (see the module docstring)."""
    if edit.kind == "add":
        region = ids_after == edit.target
        return region, region.copy()
    if edit.kind == "remove":
        region = ids_before == edit.target
        return region, region.copy()
    return ids_before == edit.target, ids_after == edit.target


@dataclass
class SynthSession:
    """A generated session before encoding: clean frames too, for ground truth checks and videos."""
    session: Session
    clean_frames: list[np.ndarray]  # K+1 x (H, W, 3) uint8, without noise (jitter included)
    offsets: list[tuple[int, int]]  # camera offset (dx, dy) of each frame


SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def session_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Each (split, seed, index) has its own stream: held-out splits never share a seed with train."""
    return np.random.default_rng([SPLIT_IDS[split], seed, index])


def session_key(split: str, seed: int, index: int) -> str:
    return f"synth-{split}-s{seed}-{index:08d}"


def generate_session(cfg: SynthConfig, split: str, seed: int, index: int) -> SynthSession:
    rng = session_rng(seed, split, index)
    res, margin = cfg.resolution, cfg.jitter_px
    turns = 1 if cfg.pairs else int(rng.integers(cfg.min_turns, cfg.max_turns + 1))
    scene = random_scene(rng, cfg, margin)
    initial = [o.__dict__.copy() for o in scene.objects]
    history = History.of(scene)
    image, ids = render(scene, res, margin)
    canvases, full_masks, instructions, transitions = [image], [], [], []
    for _ in range(turns):
        for _attempt in range(MAX_ATTEMPTS):
            kind = str(rng.choice(cfg.transitions))
            edit = propose_edit(rng, scene, kind, res, history)
            if edit is None:
                continue
            new_image, new_ids = render(edit.after, res, margin)
            if not visible_enough(edit.after, new_ids, res, margin):
                continue
            cur, nxt = edit_masks(edit, ids, new_ids)
            changed = np.any(quantize(image) != quantize(new_image), axis=-1)
            if cur.sum() == 0 or nxt.sum() == 0 or not np.array_equal(changed, cur | nxt):
                continue  # an edit that would not show, or whose masks would not be exact
            break
        else:
            raise RuntimeError(f"no valid edit found for session {index} (transitions={cfg.transitions})")
        instructions.append(edit.instruction)
        transitions.append({"kind": edit.kind, **edit.params})
        history.record(scene, edit)
        scene, image, ids = edit.after, new_image, new_ids
        canvases.append(image)
        full_masks.append((cur, nxt))

    offsets = [(int(rng.integers(-margin, margin + 1)), int(rng.integers(-margin, margin + 1))) if margin else (0, 0)
               for _ in canvases]
    clean = [quantize(crop(c, margin, off, res)) for c, off in zip(canvases, offsets)]
    images = clean
    if cfg.noise_std > 0:
        images = [quantize(f.astype(np.float32) + rng.normal(0, cfg.noise_std, f.shape)) for f in clean]
    cur_masks = [crop(cur, margin, offsets[i], res).copy() for i, (cur, _) in enumerate(full_masks)]
    next_masks = [crop(nxt, margin, offsets[i + 1], res).copy() for i, (_, nxt) in enumerate(full_masks)]
    key = session_key(split, seed, index)
    meta = {
        "source": "synth",
        "scene": key,
        "split": split,
        "seed": seed,
        "index": index,
        "initial_objects": initial,
        "transitions": transitions,
        "mask_areas": [[float(c.mean()), float(n.mean())] for c, n in zip(cur_masks, next_masks)],
        "frame_times": [float(i) for i in range(turns + 1)],
        "camera_offsets": [list(o) for o in offsets],
        "realism": {"noise_std": cfg.noise_std, "jitter_px": cfg.jitter_px},
        "resolution": [res, res],
        "annotators": {"text": "synth-template/1", "masks": "synth-exact/1"},
        "quality": 1.0,
    }
    session = Session(key=key, images=images, instructions=instructions, cur_masks=cur_masks,
                      next_masks=next_masks, meta=meta)
    return SynthSession(session=session, clean_frames=clean, offsets=offsets)


def replay_states(meta: dict) -> list[list[SceneObject]]:
    """The objects of every state I0..IK of a stored synthetic session, in drawing order, replayed from its
    metadata (`initial_objects` and the `transitions` with their parameters, which determine each edit exactly:
    see propose_edit). Raises KeyError or ValueError on metadata that is not a synthetic session's."""
    resolution = int(meta["resolution"][0])
    objects = [SceneObject(**o) for o in meta["initial_objects"]]
    states = [objects]
    for transition in meta["transitions"]:
        objects = copy.deepcopy(objects)
        kind = transition["kind"]
        if kind == "add":
            colour, shape = transition["object"].split(" ", 1)
            if "centre" in transition:  # an undone removal: where the object was
                cx, cy = transition["centre"]
            else:
                row, col = next((r, c) for r, names in enumerate(GRID_WHERE) for c, where in enumerate(names)
                                if where == transition["where"])
                cx, cy = ninth_centre(col, resolution), ninth_centre(row, resolution)
            objects.append(SceneObject(colour, shape, SIZE_NAMES.index(transition["size"]), cx, cy))
        else:
            target = next(o for o in objects if o.name == transition["object"])
            if kind == "remove":
                objects.remove(target)
            elif kind == "move":
                dx, dy = DIRECTIONS[transition["direction"]]
                target.cx += dx * transition["pixels"]
                target.cy += dy * transition["pixels"]
            elif kind == "recolour":
                target.colour = transition["colour"]
            elif kind == "resize":
                target.size += 1 if transition["direction"] == "bigger" else -1
            else:
                raise ValueError(f"unknown transition kind {kind!r}")
        states.append(objects)
    return states


def visible_masks(objects: list[SceneObject], resolution: int, margin: int, offset: tuple[int, int]) -> np.ndarray:
    """(N, resolution, resolution) bool: the pixels where each of the N objects is visible (not covered by a later
    one) in a frame taken with camera offset `offset` (dx, dy) from a canvas with jitter margin `margin`."""
    canvas = resolution + 2 * margin
    ids = np.full((canvas, canvas), -1, dtype=np.int16)
    for index, obj in enumerate(objects):
        ids[footprint(obj, resolution, canvas, margin)[0]] = index
    ids = crop(ids, margin, offset, resolution)
    return ids[None] == np.arange(len(objects), dtype=np.int16)[:, None, None]
