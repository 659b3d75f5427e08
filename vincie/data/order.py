"""The training data's order: which sessions, in what order, on which rank (from the session index). Reading and
decoding are in vincie.data.loader and vincie.data.decode; what they hand over is vincie.sessions.loaded.

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

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vincie.config import DataConfig
from vincie.errors import VincieError

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
