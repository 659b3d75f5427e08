"""The training data: which sessions, in what order, on which rank (the session index); and a session as the
loader hands it over (`LoadedSession`). Reading and decoding are in vincie.data.loader and vincie.data.decode.

Order (`SessionOrder`). The index rows that pass the filters (data.split, data.min_turns, data.min_resolution)
make epoch e: each row as many whole times as its source's weight (data.source_weights, default 1), plus, for a
fractional weight, a subset of that source drawn with (seed, e); the list is then permuted with (seed, e). The
epochs are concatenated into one stream, with no batch boundary at an epoch's end (nothing is dropped). A step
takes the next train.batch_size positions of the stream; data-parallel rank r takes positions
start + r + j * dp_size, j = 0, 1, ... So what a rank reads is a pure function of (seed, start, rank, dp_size),
and the stream position (`SamplerState`: epoch, cursor) is the whole loader state: a run resumed with any number
of loader workers, or of data-parallel ranks dividing the batch, continues exactly where it stopped, and every
entry of every epoch is consumed exactly once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from vincie.config import DataConfig
from vincie.errors import VincieError
from vincie.sessions.session import Session

# why a session was skipped (the `reason` label of vincie_data_skipped_total)
SKIP_REASONS = (
    "bad_json",  # json member unreadable, or fields missing / inconsistent
    "missing_member",  # an image, mask or json member the session needs is not in the sample
    "corrupt_image",  # an image or mask is truncated, does not decode, or has another size than the json says
    "bad_tar",  # the index's byte range does not hold the session's tar members (truncated or rewritten shard)
    "missing_shard",  # the shard is gone (deleted after the index was built)
    "storage",  # storage errors or timeouts on every attempt (storage.read_attempts)
    "bad_features",  # precomputed latents / text embeddings that do not parse
)


@dataclass
class SamplerState:
    epoch: int = 0
    cursor: int = 0  # entries of this epoch consumed by all ranks together


@dataclass
class RowRef:
    """Where one session lives: its tar members are bytes [offset, offset + size) of root/shard."""
    id: str
    shard: str
    offset: int
    size: int


@dataclass
class LoadedSession:
    """A session ready for the sequence builder: pixels at its bucket, or precomputed latents."""
    key: str
    instructions: list[str]  # K
    has_masks: bool
    size: tuple[int, int]  # (H, W) of the bucket, pixels
    images: torch.Tensor | None  # (K+1, 3, H, W) float32 in [-1, 1]; None when `latents` holds them
    cur_masks: torch.Tensor | None  # (K, H, W) bool: changed region in image i; None without masks or with latents
    next_masks: torch.Tensor | None  # (K, H, W) bool: changed region in image i+1
    latents: dict[str, torch.Tensor] | None = None  # precomputed: image (K+1, C, h, w), cur / next (K, C, h, w)
    text: list[torch.Tensor] | None = None  # precomputed text-encoder output per instruction: (L_i, D)
    meta: dict = dataclasses.field(default_factory=dict)  # the json member's meta (source, transitions, ...)

    @property
    def turns(self) -> int:
        return len(self.instructions)


def from_session(session: Session) -> LoadedSession:
    """An in-memory Session (uint8 pixels, at its own size) as the loader would hand it over at that size."""
    def masks(ms):
        return torch.from_numpy(np.stack(ms)) if session.has_masks else None

    images = torch.from_numpy(np.stack(session.images)).permute(0, 3, 1, 2).float()  # (K+1, 3, H, W)
    return LoadedSession(key=session.key, instructions=list(session.instructions), has_masks=session.has_masks,
                         size=(session.height, session.width), images=(images - 127.5) / 127.5,
                         cur_masks=masks(session.cur_masks), next_masks=masks(session.next_masks),
                         meta=session.meta)


def sub_session(session: LoadedSession, first: int, turns: int) -> LoadedSession:
    """Turns [first, first + turns) with their images [first, first + turns]."""
    last = first + turns

    def cut(x, images: bool):
        return None if x is None else x[first:last + 1] if images else x[first:last]

    latents = None if session.latents is None else \
        {name: cut(x, name == "image") for name, x in session.latents.items()}
    return dataclasses.replace(session, instructions=session.instructions[first:last],
                               images=cut(session.images, True), cur_masks=cut(session.cur_masks, False),
                               next_masks=cut(session.next_masks, False), latents=latents,
                               text=cut(session.text, False))


def truncate(session: LoadedSession, turns: int) -> LoadedSession:
    return session if session.turns <= turns else sub_session(session, 0, turns)


class SessionOrder:
    """The filtered index and the epoch stream over it (module docstring)."""

    def __init__(self, table: pa.Table, data: DataConfig, seed: int, url: str):
        total = table.num_rows
        unknown = sorted(set(data.source_weights) - set(pc.unique(table["source"]).to_pylist()))
        if unknown:
            raise VincieError(f"data.source_weights names {unknown}, which the index of {url} does not have "
                              f"(sources: {', '.join(sorted(pc.unique(table['source']).to_pylist())) or 'none'})")
        keep = pc.and_(pc.greater_equal(table["turns"], data.min_turns),
                       pc.greater_equal(pc.min_element_wise(table["width"], table["height"]), data.min_resolution))
        if data.split:
            keep = pc.and_(keep, pc.equal(table["split"], data.split))
        table = table.filter(keep)
        sources = sorted(pc.unique(table["source"]).to_pylist())
        source = pc.index_in(table["source"], value_set=pa.array(sources, pa.string())).to_numpy()
        weights = np.array([data.source_weights.get(s, 1.0) for s in sources])
        self.seed = seed
        self.whole = np.floor(weights[source]).astype(np.int64) if len(sources) else np.zeros(0, np.int64)
        self.fractions = [(np.flatnonzero(source == k), w - np.floor(w)) for k, w in enumerate(weights)]
        self.length = int(self.whole.sum()) + sum(round(f * len(rows)) for rows, f in self.fractions)
        if self.length == 0:
            raise VincieError(f"{url}: no sessions left to train on ({total} in the index; filters data.split="
                              f"{data.split!r}, data.min_turns={data.min_turns}, data.min_resolution="
                              f"{data.min_resolution}, data.source_weights={data.source_weights})")
        shard = pc.dictionary_encode(table["shard"]).combine_chunks()
        self.shard_names = shard.dictionary.to_pylist()
        self.shard_codes = shard.indices.to_numpy()
        self.ids = table["id"].combine_chunks()
        self.offsets = table["offset"].to_numpy()
        self.sizes = table["size"].to_numpy()
        self.cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Entries per epoch."""
        return self.length

    def epoch(self, e: int) -> np.ndarray:
        """Row numbers (into the filtered index) of epoch e, in the order they are consumed."""
        if self.cached is None or self.cached[0] != e:
            parts = [np.repeat(np.arange(len(self.whole)), self.whole)]
            for k, (rows, fraction) in enumerate(self.fractions):
                extra = round(fraction * len(rows))
                if extra:
                    parts.append(np.sort(np.random.default_rng([self.seed, e, 1, k]).choice(rows, extra, False)))
            entries = np.concatenate(parts)
            self.cached = (e, entries[np.random.default_rng([self.seed, e]).permutation(len(entries))])
        return self.cached[1]

    def ref(self, row: int) -> RowRef:
        return RowRef(self.ids[row].as_py(), self.shard_names[self.shard_codes[row]], int(self.offsets[row]),
                      int(self.sizes[row]))

    def at(self, position: int) -> RowRef:
        """The session at a position of the stream (epoch position // len, entry position % len)."""
        epoch, entry = divmod(position, self.length)
        return self.ref(int(self.epoch(epoch)[entry]))

    def position(self, state: SamplerState) -> int:
        return state.epoch * self.length + state.cursor

    def state(self, position: int) -> SamplerState:
        return SamplerState(*divmod(position, self.length))
