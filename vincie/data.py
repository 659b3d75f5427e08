"""Sessions for training, addressed through the session index (issue [4/8] replaces the decode path with a
streaming DALI loader; the order and position rules here stay).

Order: epoch e visits the index rows in the permutation drawn from (seed, e); each optimizer step takes the next
`global_batch` rows of it, and data-parallel rank r takes every dp_size-th of those. The position (epoch, cursor)
is saved with every checkpoint, so a resumed run continues exactly where it stopped. A last partial batch of an
epoch is dropped, so every step has the same size.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data_index.index import read_index
from vincie import storage
from vincie.config import StorageConfig
from vincie.errors import VincieError
from vincie.session import Session, sample_to_session
from vincie.shards import split_member_name


def resize_session(session: Session, size: int) -> Session:
    """Images bicubic, masks nearest, to size x size."""
    if session.height == size and session.width == size:
        return session

    def image(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC))

    def mask(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) >= 128

    return Session(key=session.key, images=[image(a) for a in session.images], instructions=session.instructions,
                   cur_masks=[mask(a) for a in session.cur_masks] if session.has_masks else None,
                   next_masks=[mask(a) for a in session.next_masks] if session.has_masks else None,
                   meta=session.meta)


class SessionDataset:
    def __init__(self, root: str, cfg: StorageConfig | None = None, split: str | None = None,
                 resolution: int | None = None):
        self.root, self.cfg, self.resolution = root, cfg, resolution
        rows = read_index(root, cfg).to_pylist()
        if split is not None:
            rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise VincieError(f"{root}: no sessions" + (f" in split '{split}'" if split else ""))
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, i: int) -> Session:
        """One session by index row: one ranged read of its tar members."""
        row = self.rows[i]
        url = storage.join(self.root, row["shard"])
        fs, path = storage.filesystem(url, self.cfg)
        with storage.storage_errors(url, self.cfg):
            data = fs.cat_file(path, start=row["offset"], end=row["offset"] + row["size"])
        sample = {"__key__": row["id"]}
        with tarfile.open(fileobj=io.BytesIO(data + b"\0" * 1024), mode="r:") as tar:
            for info in tar:
                key, suffix = split_member_name(info.name)
                if key != row["id"]:
                    raise VincieError(f"{url}: offset {row['offset']} holds {key}, the index says {row['id']} "
                                      f"(run: vincie data index verify {self.root})")
                sample[suffix] = tar.extractfile(info).read()
        session = sample_to_session(sample)
        return resize_session(session, self.resolution) if self.resolution else session


def truncate(session: Session, turns: int) -> Session:
    if session.turns <= turns:
        return session
    return sub_session(session, 0, turns)


def sub_session(session: Session, first: int, turns: int) -> Session:
    """Turns [first, first + turns) with their images [first, first + turns]."""
    last = first + turns
    return Session(key=session.key, images=session.images[first:last + 1],
                   instructions=session.instructions[first:last],
                   cur_masks=session.cur_masks[first:last] if session.has_masks else None,
                   next_masks=session.next_masks[first:last] if session.has_masks else None, meta=session.meta)


@dataclass
class SamplerState:
    epoch: int = 0
    cursor: int = 0  # rows of this epoch's permutation already consumed


class EpochSampler:
    def __init__(self, size: int, seed: int, global_batch: int, state: SamplerState | None = None):
        if global_batch > size:
            raise VincieError(f"train.batch_size {global_batch} is larger than the dataset ({size} sessions)")
        self.size, self.seed, self.global_batch = size, seed, global_batch
        self.state = state or SamplerState()

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def next_rows(self, dp_rank: int, dp_size: int) -> list[int]:
        if self.state.cursor + self.global_batch > self.size:
            self.state = SamplerState(self.state.epoch + 1, 0)
        rows = self.permutation(self.state.epoch)[self.state.cursor:self.state.cursor + self.global_batch]
        self.state.cursor += self.global_batch
        return [int(r) for r in rows[dp_rank::dp_size]]
