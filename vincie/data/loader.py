"""The training loader: reads the sessions vincie.data.order's order gives this rank, in loader processes, and hands
them over in order; a bad session is skipped, logged once and counted, never fatal.

Reading one session: one ranged read of its tar members (the index's byte range: one GET on S3), retried with
backoff on storage errors (storage.read_attempts, storage.retry_backoff_s); parsed with WebDataset's tar iterators;
cut to data.max_turns; decoded with DALI at its bucket (vincie.data.decode). Precomputed latents / text features in the
sample (vincie.sessions.features) replace decoding and encoding when they were made for this config.

Processes: a torch DataLoader with data.workers processes over `RankStream`. Worker w reads the rank's items
j = w, w + W, ... counted from the position the stream started at; the DataLoader takes the workers' items round
robin, i.e. in order of j, so the training process receives the rank's sequence in order and its position counts
what it consumed. Items read ahead but not consumed are dropped when the loader stops and read again after a
resume, by any number of workers. On a GPU the workers read and parse, and the training process decodes with
DALI's `mixed` pipeline (CUDA cannot be used in forked workers).

Bad data: a session that cannot be read becomes a `Skipped` item with a reason (vincie.data.order.SKIP_REASONS).
It counts as consumed (not read again this epoch); the training process logs it once, naming shard and key, and
counts it in vincie_data_skipped_total{reason}.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import io
import itertools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vincie import storage
from vincie.config import Config, bucket_shapes
from vincie.data.decode import DaliDecoder, PilDecoder, Request, nearest_bucket
from vincie.data.order import RowRef, SamplerState, SessionOrder
from vincie.errors import VincieError
from vincie.sessions import features
from vincie.sessions.index import read_index
from vincie.sessions.loaded import LoadedSession
from vincie.sessions.session import SessionFormatError, find_member, parse_header

PICTURES_PER_RUN = 64  # the most images (or masks) one DALI run decodes; more take several runs
# Objects a forked loader process inherits and must not free: a DALI pipeline's destructor joins its worker
# threads, which exist only in the parent (freeing one in a child crashes it with SIGSEGV).
INHERITED: list = []


@dataclass
class Skipped:
    key: str
    shard: str
    reason: str  # one of vincie.data.order.SKIP_REASONS
    message: str


@dataclass
class Fetched:
    """A session read and parsed but not decoded (decoding happens in the training process, on its GPU)."""
    ref: RowRef
    sample: dict


class Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SessionReader:
    """Reads sessions of one dataset root. One per process: its filesystem and DALI pipelines are made on first use
    in the process that uses them (a forked worker makes its own)."""

    def __init__(self, cfg: Config, root: str, max_turns: int, device_id: int | None = None,
                 decoder: str | None = None):
        """`decoder`: dali or pil (None: data.decoder)."""
        self.cfg, self.root, self.max_turns = cfg, root, max_turns
        self.device_id, self.decoder_kind = device_id, decoder or cfg.data.decoder
        self.shapes = bucket_shapes(cfg)
        self.vae, self.text_encoder = features.vae_id(cfg), features.text_encoder_id(cfg)
        self.pid = None

    def ensure_process(self) -> None:
        if self.pid != os.getpid():
            if self.pid is not None:  # a forked loader process: the parent's decoder must never be freed here
                INHERITED.append(self.decoder)
            self.pid = os.getpid()
            self.fs = storage.filesystem(self.root, self.cfg.storage)[0]
            # one request per attempt: s3fs would retry timeouts and SlowDown up to 5 x 5 times inside one call
            # (two nested retry loops), so storage.read_attempts (and botocore's storage.max_attempts) decide
            self.fs.retries = 1
            threads = self.cfg.data.decode_threads
            self.decoder = PilDecoder(self.shapes, threads) if self.decoder_kind == "pil" else \
                DaliDecoder(self.shapes, threads, max_batch=PICTURES_PER_RUN, device_id=self.device_id)
            self.warned_features = False

    def read_many(self, refs: list[RowRef], decode: bool = True) -> list[LoadedSession | Fetched | Skipped]:
        """Sessions read one by one and decoded together."""
        self.ensure_process()
        fetched: list[Fetched | Skipped] = []
        for ref, data in zip(refs, self.fetch_many(refs)):
            try:
                if isinstance(data, Skip):
                    raise data
                fetched.append(Fetched(ref, self.parse(ref, data)))
            except Skip as exc:
                fetched.append(Skipped(ref.id, ref.shard, exc.reason, str(exc)))
        return self.load_many(fetched) if decode else fetched

    def read(self, ref: RowRef) -> LoadedSession | Skipped:
        return self.read_many([ref])[0]

    def load_many(self, items: list[Fetched | Skipped]) -> list[LoadedSession | Skipped]:
        """Read sessions -> decoded sessions (one decoder call for all that need decoding)."""
        self.ensure_process()
        prepared = []
        for item in items:
            try:
                prepared.append(item if isinstance(item, Skipped) else self.prepare(item.ref, item.sample))
            except Skip as exc:
                prepared.append(Skipped(item.ref.id, item.ref.shard, exc.reason, str(exc)))
        requests = [p[2] for p in prepared if not isinstance(p, Skipped) and p[2] is not None]
        decoded = iter(self.decoder.decode_many(requests))
        out = []
        for p in prepared:
            if isinstance(p, Skipped):
                out.append(p)
                continue
            ref, session, request = p
            if request is not None:
                frames = next(decoded)
                if isinstance(frames, SessionFormatError):
                    out.append(Skipped(ref.id, ref.shard, frames.reason, f"{ref.shard}: {frames}"))
                    continue
                session.images = frames.images
                if session.has_masks:
                    session.cur_masks, session.next_masks = frames.masks[0::2], frames.masks[1::2]
            out.append(session)
        return out

    def fetch_many(self, refs: list[RowRef]) -> list[bytes | Skip]:
        """The byte ranges of the sessions, requested concurrently (fsspec `cat_ranges`; on S3 the GETs overlap).
        Ranges that fail are retried, all together, after retry_backoff_s x 2^k; a missing shard is not."""
        urls = [storage.join(self.root, ref.shard) for ref in refs]
        out: list[bytes | Skip | None] = [None] * len(refs)
        pending = list(range(len(refs)))
        attempts = self.cfg.storage.read_attempts
        for attempt in range(1, attempts + 1):
            try:
                with storage.storage_errors(self.root, self.cfg.storage):
                    results = self.fs.cat_ranges([self.fs._strip_protocol(urls[k]) for k in pending],
                                                 [refs[k].offset for k in pending],
                                                 [refs[k].offset + refs[k].size for k in pending], on_error="return")
            except storage.StorageError as exc:
                results = [exc.__cause__ or exc] * len(pending)
            failed = []
            for k, data in zip(pending, results):
                ref, url = refs[k], urls[k]
                if isinstance(data, FileNotFoundError):
                    out[k] = Skip("missing_shard", f"{url}: the shard is gone (deleted after the index was built?)")
                elif isinstance(data, BaseException):
                    failed.append(k)
                    out[k] = Skip("storage", f"{storage.describe_error(url, data, self.cfg.storage)} (gave up "
                                             f"after {attempts} attempts)")
                elif len(data) != ref.size:
                    out[k] = Skip("bad_tar", f"{url}: {len(data)} of the {ref.size} bytes at offset {ref.offset}: "
                                             "the shard is shorter than the index says (truncated?)")
                else:
                    out[k] = data
            pending = failed
            if not pending or attempt == attempts:
                break
            time.sleep(min(30.0, self.cfg.storage.retry_backoff_s * 2 ** (attempt - 1)))
        return out

    def parse(self, ref: RowRef, data: bytes) -> dict:
        """The session's tar members -> a WebDataset sample {"__key__", suffix: bytes}."""
        from webdataset.tariterators import group_by_keys, tar_file_expander

        stream = io.BytesIO(data + b"\0" * 1024)  # the range holds members only; add the end-of-archive blocks
        try:
            samples = list(group_by_keys(tar_file_expander([{"url": ref.shard, "stream": stream}])))
        except Exception as exc:  # tarfile and webdataset raise several types for damaged bytes
            raise Skip("bad_tar", f"{ref.shard}: the bytes at offset {ref.offset} are not a tar of session "
                                  f"{ref.id} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
        keys = [s["__key__"] for s in samples]
        if keys != [ref.id]:
            raise Skip("bad_tar", f"{ref.shard}: offset {ref.offset} holds {keys}, the index says {ref.id} "
                                  f"(run: vincie data index verify {self.root})")
        return {k: v for k, v in samples[0].items() if k != "__url__"}

    def prepare(self, ref: RowRef, sample: dict) -> tuple[RowRef, LoadedSession, Request | None]:
        """A parsed sample -> (ref, the session without pixels, what to decode for them: None when precomputed
        latents stand in). Raises Skip."""
        key = ref.id
        try:
            if "json" not in sample:
                raise SessionFormatError(f"session {key}: missing json member", "missing_member")
            header = parse_header(key, sample["json"])
            turns = min(len(header["instructions"]), self.max_turns)
            has_masks = header["has_masks"]
            shape = nearest_bucket(header["width"], header["height"], self.shapes)
            latents, text = self.read_features(ref, sample, shape, turns)
            request = None
            if latents is None:
                members = [find_member(sample, key, f"{i:03d}.img", ("jpg", "png", "jpeg")) for i in range(turns + 1)]
                masks = [find_member(sample, key, f"{i:03d}.{kind}", ("png",))
                         for i in range(turns if has_masks else 0) for kind in ("cur", "next")]
                request = Request(key, members, masks, header["width"], header["height"], shape)
        except SessionFormatError as exc:
            raise Skip(exc.reason, f"{ref.shard}: {exc}") from None
        session = LoadedSession(key=key, instructions=list(header["instructions"][:turns]), has_masks=has_masks,
                                size=shape, images=None, cur_masks=None, next_masks=None, latents=latents, text=text,
                                meta=header["meta"])
        return ref, session, request

    def read_features(self, ref: RowRef, sample: dict, shape: tuple[int, int], turns: int):
        """-> (latents cut to `turns`, text features cut to `turns`), each None when absent or made for another
        config (then a line once per process)."""
        try:
            latents = features.read_latents(sample[features.LATENTS], self.vae, shape) \
                if features.LATENTS in sample else None
            text = features.read_text(sample[features.TEXT], self.text_encoder) if features.TEXT in sample else None
        except (ValueError, KeyError, RuntimeError) as exc:  # safetensors raises these for damaged bytes
            raise Skip("bad_features", f"{ref.shard}: session {ref.id}: precomputed features do not parse "
                                       f"({type(exc).__name__}: {str(exc)[:120]})") from None
        unused = (features.LATENTS in sample and latents is None) or \
            (features.TEXT in sample and text is None and self.text_encoder is not None)
        if unused and not self.warned_features:
            self.warned_features = True
            print(f"data: {ref.shard} carries precomputed features made for another VAE, bucket or text encoder "
                  f"than this config's ({self.vae}, {shape[1]}x{shape[0]}, {self.text_encoder}); decoding and "
                  "encoding instead", file=sys.stderr)
        if latents is not None:
            latents = {"image": latents["image"][:turns + 1]} | \
                      {k: latents[k][:turns] for k in ("cur", "next") if k in latents}
        return latents, (text[:turns] if text is not None else None)


class RankStream(IterableDataset):
    """The items of one data-parallel rank from stream position `start`, (j, session j of the rank), in chunks of
    `chunk` consecutive items read and decoded together: worker w of W takes chunks w, w + W, ..."""

    def __init__(self, reader: SessionReader, order: SessionOrder, start: int, dp_rank: int, dp_size: int,
                 chunk: int, decode: bool):
        self.reader, self.order, self.start, self.dp_rank, self.dp_size = reader, order, start, dp_rank, dp_size
        self.chunk, self.decode = chunk, decode

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        for c in itertools.count(worker, workers):
            items = range(c * self.chunk, (c + 1) * self.chunk)
            refs = [self.order.at(self.start + self.dp_rank + j * self.dp_size) for j in items]
            for j, item in zip(items, self.reader.read_many(refs, self.decode)):
                yield j, tensors_as(item, torch.Tensor.numpy)


def identity(x):
    return x


def tensors_as(item, convert):
    """A LoadedSession's tensors converted (torch <-> numpy). Loader processes hand sessions over as numpy
    arrays, which pickle by value through the worker's pipe: torch tensors go through shared memory, one file
    descriptor per tensor passed over a socket, which cost ~10 ms per session here against ~0.1 ms."""
    if not isinstance(item, LoadedSession):
        return item

    def each(x):
        return None if x is None else convert(x)

    latents = None if item.latents is None else {k: convert(v) for k, v in item.latents.items()}
    return dataclasses.replace(item, images=each(item.images), cur_masks=each(item.cur_masks),
                               next_masks=each(item.next_masks), latents=latents,
                               text=None if item.text is None else [convert(t) for t in item.text])


class Loader:
    """This rank's sessions, in order, from a stream position that `state` reads and `seek` sets."""

    def __init__(self, cfg: Config, dp_rank: int = 0, dp_size: int = 1, device: torch.device | None = None,
                 on_skip: Callable[[str], None] | None = None, decoder: str | None = None):
        """`on_skip(reason)`: called once per skipped session (the trainer counts them in its metrics)."""
        url = cfg.data.train_url
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.order = SessionOrder(read_index(url, cfg.storage), cfg.data, cfg.run.seed, url)
        gpu = device is not None and device.type == "cuda"
        self.reader = SessionReader(cfg, url, cfg.data.max_turns, device.index if gpu else None, decoder)
        # on a GPU, DALI decodes in this process (nvJPEG on the device); PIL decodes ahead in the loader processes
        self.decode_in_workers = not gpu or self.reader.decoder_kind == "pil"
        self.on_skip = on_skip or (lambda reason: None)
        self.position = 0  # stream positions consumed by all ranks together
        self.iterator = None
        self.buffer: collections.deque = collections.deque()  # the rest of the chunk the iterator gave last
        self.consumed = 0  # items this rank took from the current iterator
        self.logged: set[tuple[str, ...]] = set()

    @property
    def state(self) -> SamplerState:
        return self.order.state(self.position)

    def seek(self, state: SamplerState) -> None:
        self.close()
        self.position = self.order.position(state)

    def start(self) -> None:
        d = self.cfg.data
        stream = RankStream(self.reader, self.order, self.position, self.dp_rank, self.dp_size, d.read_batch,
                            self.decode_in_workers)
        ahead = d.prefetch_steps * self.cfg.train.batch_size // self.dp_size  # sessions, all workers together
        # batch_size = the stream's chunk: a worker yields a chunk's items in a row, so each batch is one chunk
        chunks_ahead = -(-ahead // (d.workers * d.read_batch)) if d.workers else None  # per worker
        loader = DataLoader(stream, batch_size=d.read_batch, num_workers=d.workers, collate_fn=identity,
                            prefetch_factor=chunks_ahead, multiprocessing_context="fork" if d.workers else None)
        # The workers fork here. What the parent left for its cyclic garbage collector (a dropped decoder, say)
        # is frozen first, so that no worker ever collects it (see INHERITED); the parent collects it as before.
        gc.freeze()
        try:
            self.iterator = iter(loader)
        finally:
            gc.unfreeze()
        self.buffer.clear()
        self.consumed = 0

    def next(self, count: int) -> list[LoadedSession | Skipped]:
        """This rank's next `count` sessions (bad ones as Skipped, already logged and counted); all ranks take the
        same count, so the stream advances by count x dp_size."""
        if self.iterator is None:
            self.start()
        items = []
        while len(items) < count:
            if not self.buffer:
                self.buffer.extend(next(self.iterator))
            j, item = self.buffer.popleft()
            if j != self.consumed:
                raise RuntimeError(f"loader: got item {j}, expected {self.consumed}")  # a bug, not bad data
            self.consumed += 1
            items.append(tensors_as(item, torch.from_numpy))
        fetched = [k for k, item in enumerate(items) if isinstance(item, Fetched)]  # GPU: decode here, together
        for k, item in zip(fetched, self.reader.load_many([items[k] for k in fetched])):
            items[k] = item
        for item in items:
            if isinstance(item, Skipped):
                self.report(item)
        self.position += count * self.dp_size
        return items

    def report(self, item: Skipped) -> None:
        self.on_skip(item.reason)
        once = (item.reason, item.shard) if item.reason == "missing_shard" else (item.reason, item.shard, item.key)
        if once not in self.logged:
            self.logged.add(once)
            print(f"data: skipped {item.shard} {item.key} ({item.reason}): {item.message}", file=sys.stderr)

    def close(self) -> None:
        """Stops the loader processes; what they read ahead is dropped."""
        self.iterator = None  # the DataLoader iterator shuts its workers down when released
        self.buffer.clear()


def load_sessions(cfg: Config, url: str, max_turns: int, count: int | None = None) -> list[LoadedSession]:
    """The first `count` readable sessions of `url` in index order (for evaluation), decoded as for training; bad
    ones are skipped with a line each."""
    table = read_index(url, cfg.storage)
    reader = SessionReader(cfg, url, max_turns)
    sessions = []
    for row in table.select(["id", "shard", "offset", "size"]).to_pylist():
        if count is not None and len(sessions) == count:
            break
        item = reader.read(RowRef(row["id"], row["shard"], row["offset"], row["size"]))
        if isinstance(item, Skipped):
            print(f"data: skipped {item.shard} {item.key} ({item.reason}): {item.message}", file=sys.stderr)
        else:
            sessions.append(item)
    if not sessions:
        raise VincieError(f"{url}: no readable sessions")
    return sessions
