"""`vincie data precompute`: a copy of a dataset whose sessions also carry their VAE latents and, for a frozen
text encoder, their text features (vincie.sessions.features), so that training skips decoding and encoding.

Pixels are decoded exactly as the training loader decodes them (DALI, the config's buckets) and encoded with the
config's VAE / text encoder, so a run on the copy sees the same inputs as a run on the original. Shards keep their
names and session order and are written atomically; a rerun keeps the shards already complete at --out; the index
is built last. A session that cannot be read is copied as it is (without features), with a line.
"""

from __future__ import annotations

import sys

import torch

from vincie import storage
from vincie.config import Config
from vincie.data.loader import Fetched, SessionReader, Skip, Skipped
from vincie.data.order import RowRef
from vincie.model.batch import masks_to_pixels
from vincie.model.text_encoder import build_text_encoder, prompts
from vincie.model.vae import build_vae
from vincie.progress import track
from vincie.sessions import features
from vincie.sessions.index import build_index
from vincie.sessions.shards import SHARD_SUFFIX, ShardWriter, scan_shard

ALL_TURNS = 1 << 16


@torch.no_grad()
def session_features(reader: SessionReader, vae, text_encoder, ref: RowRef, members: dict) -> dict[str, bytes]:
    """-> the feature members of one session (raises Skip when it cannot be read)."""
    (loaded,) = reader.load_many([Fetched(ref, {"__key__": ref.id, **members})])
    if isinstance(loaded, Skipped):
        raise Skip(loaded.reason, loaded.message)
    latents = {"image": vae.encode(loaded.images)}
    if loaded.has_masks:
        latents |= {"cur": vae.encode(masks_to_pixels(loaded.cur_masks)),
                    "next": vae.encode(masks_to_pixels(loaded.next_masks))}
    out = {features.LATENTS: features.latents_bytes(latents, reader.vae, loaded.size)}
    if text_encoder is not None:
        texts = prompts(reader.cfg.text_encoder.prompt_template, loaded.instructions)
        out[features.TEXT] = features.text_bytes(text_encoder.encode(texts), reader.text_encoder)
    return out


def precompute(in_url: str, out_url: str, cfg: Config, progress: bool = True) -> dict:
    shards = storage.list_files(in_url, SHARD_SUFFIX, cfg.storage)
    if not shards:
        raise storage.StorageError(f"{in_url}: no shards (*{SHARD_SUFFIX}) to precompute")
    storage.makedirs(out_url, cfg.storage)
    done = {url.rsplit("/", 1)[-1] for url in storage.list_files(out_url, SHARD_SUFFIX, cfg.storage)}
    reader = SessionReader(cfg, in_url, ALL_TURNS)
    reader.ensure_process()
    vae = build_vae(cfg.vae)
    text_encoder = build_text_encoder(cfg.text_encoder, cfg.model.text_dim) if reader.text_encoder else None
    counts = {"sessions": 0, "without_features": 0, "kept_shards": len(done)}
    for url in track(shards, desc="precompute", unit="shard", enabled=progress):
        name = url.rsplit("/", 1)[-1]
        if name in done:
            continue
        with ShardWriter(storage.join(out_url, name), cfg.storage) as writer:
            for sample in scan_shard(url, cfg.storage):
                extra = {}
                try:
                    extra = session_features(reader, vae, text_encoder, RowRef(sample.key, name, sample.offset,
                                                                                 sample.size), sample.members)
                except Skip as exc:
                    counts["without_features"] += 1
                    print(f"precompute: copied without features: {exc}", file=sys.stderr)
                for suffix, data in (sample.members | extra).items():
                    writer.add_member(f"{sample.key}.{suffix}", data)
                counts["sessions"] += 1
    build_index(out_url, cfg.storage, progress=progress)
    return counts
