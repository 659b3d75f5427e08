"""`vincie bench ...`: performance benchmarks. Figures go to docs/BENCHMARKS.md with the command and machine."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import tempfile
import time

from tqdm import tqdm

from vincie.cli_common import add_config_arguments, config_from_args
from vincie.errors import VincieError


def bench_synth(args: argparse.Namespace) -> int:
    from data_index.synth import SynthJob, run_synth
    from data_index.world import generate_session

    cfg = config_from_args(args, extra=[f"synth.resolution={args.resolution}"])
    results = {"resolution": args.resolution, "sessions": args.sessions, "cpus": os.cpu_count(),
               "machine": platform.processor() or platform.machine()}
    start = time.perf_counter()
    for i in range(args.sessions):
        generate_session(cfg.synth, "train", 0, i)
    results["render_sessions_per_s_1proc"] = args.sessions / (time.perf_counter() - start)
    for workers in sorted({1, args.workers}):
        with tempfile.TemporaryDirectory() as tmp:
            job = SynthJob(out=os.path.join(tmp, "data"), sessions=args.sessions, split="train", seed=0,
                           synth=cfg.synth)
            start = time.perf_counter()
            run_synth(job, cfg.storage, workers=workers, progress=False)
            results[f"end_to_end_sessions_per_s_{workers}proc"] = args.sessions / (time.perf_counter() - start)
    print_results(results, args.json)
    return 0


def print_results(results: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=1))
        return
    for key, value in results.items():
        print(f"{key:44s} {value:.3f}" if isinstance(value, float) else f"{key:44s} {value}")


@contextlib.contextmanager
def s3_server():
    """moto's S3 server in its own process on a free 127.0.0.1 port (in this process it would share the GIL with
    the reader it serves), with throwaway credentials -> its endpoint URL."""
    import socket
    import subprocess
    import sys

    if importlib.util.find_spec("moto") is None:
        raise VincieError("vincie bench loader needs moto's S3 server for its S3 figures "
                          "(pip install 'moto[server]', part of vincie's [test] extra)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise VincieError(f"moto's S3 server did not start on 127.0.0.1:{port}") from None
                time.sleep(0.2)
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1"})
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait()


def copy_dataset(local: str, url: str, cfg) -> None:
    from vincie import storage

    for name in sorted(os.listdir(local)):
        if name.endswith((".tar", ".parquet")):
            storage.put_file_atomic(os.path.join(local, name), storage.join(url, name), cfg)


def read_all(cfg, root: str, decoder: str) -> tuple[float, int, int]:
    """Reads every session of `root` in index order in this process (ranged read, parse, decode) ->
    (seconds, sessions, pictures decoded: images and masks)."""
    from data_index.index import read_index
    from vincie.data import RowRef
    from vincie.loader import SessionReader, Skipped

    refs = [RowRef(r["id"], r["shard"], r["offset"], r["size"])
            for r in read_index(root, cfg.storage).select(["id", "shard", "offset", "size"]).to_pylist()]
    reader = SessionReader(cfg, root, max_turns=cfg.data.max_turns, decoder=decoder)
    reader.read(refs[0])  # warm up: pipelines built, connection open
    pictures = 0
    group = cfg.data.read_batch
    start = time.perf_counter()
    for k in range(0, len(refs), group):  # as a loader process reads them
        for item in reader.read_many(refs[k:k + group]):
            if isinstance(item, Skipped):
                raise VincieError(f"bench data is bad: {item.message}")
            pictures += item.images.shape[0] + (2 * item.turns if item.has_masks else 0)
    return time.perf_counter() - start, len(refs), pictures


def tiny_wait_share(cfg, steps: int, warmup: int) -> dict:
    """Trains `tiny` for `steps` steps in this process; the share of step time spent waiting for the loader (after
    `warmup` steps, which include starting the loader processes)."""
    from vincie.parallel import init_distributed
    from vincie.train import Trainer

    trainer = Trainer(cfg, init_distributed(), progress=False)
    logs = [trainer.train_step() for _ in tqdm(range(steps), desc="tiny training", unit="step")]
    trainer.loader.close()
    measured = logs[warmup:]
    step_s = sum(log["step_s"] for log in measured)
    return {"tiny_step_s": step_s / len(measured),
            "tiny_data_wait_share": sum(log["data_s"] for log in measured) / step_s}


def bench_loader(args: argparse.Namespace) -> int:
    from data_index.synth import SynthJob, run_synth
    from vincie.config import SynthConfig

    results = {"cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
               "sessions": args.sessions, "source": f"{args.resolution}x{args.resolution} {args.image_format}",
               "bucket": f"{args.bucket}x{args.bucket}", "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp, s3_server() as endpoint:
        local = os.path.join(tmp, "data")
        synth = SynthConfig(resolution=args.resolution, image_format=args.image_format, shard_size=64)
        run_synth(SynthJob(out=local, sessions=args.sessions, split="train", seed=0, synth=synth), None, workers=1)
        remote = "s3://vincie-bench/data"
        cfg = config_from_args(args, extra=[f"data.resolution={args.bucket}", f"data.decode_threads={args.threads}",
                                            f"storage.s3_endpoint_url={endpoint}"])
        import boto3

        boto3.client("s3", endpoint_url=cfg.storage.s3_endpoint_url).create_bucket(Bucket="vincie-bench")
        copy_dataset(local, remote, cfg.storage)
        runs = [(source, root, decoder, k) for k in range(args.repeats) for source, root in (("local", local),
                ("s3", remote)) for decoder in ("dali", "pil")]  # interleaved, so load changes hit both alike
        best: dict[tuple[str, str], tuple[float, int, int]] = {}
        for source, root, decoder, _ in tqdm(runs, desc="decode", unit="pass"):
            seconds, sessions, pictures = read_all(cfg, root, decoder)
            if (source, decoder) not in best or seconds < best[source, decoder][0]:
                best[source, decoder] = (seconds, sessions, pictures)
        for (source, decoder), (seconds, sessions, pictures) in best.items():
            results[f"{source}_{decoder}_sessions_per_s"] = sessions / seconds
            results[f"{source}_{decoder}_images_per_s"] = pictures / seconds
        for source in ("local", "s3"):
            results[f"{source}_dali_over_pil"] = best[source, "pil"][0] / best[source, "dali"][0]
        if args.steps:
            tiny = os.path.join(tmp, "tiny")
            synth = SynthConfig(resolution=32, image_format="png", shard_size=256)
            run_synth(SynthJob(out=tiny, sessions=args.tiny_sessions, split="train", seed=0, synth=synth), None,
                      workers=1)
            tiny_cfg = config_from_args(args, extra=[f"data.train_url={tiny}", f"data.workers={args.workers}",
                                                     f"run.out_dir={os.path.join(tmp, 'run')}"])
            results |= {"tiny_workers": args.workers} | tiny_wait_share(tiny_cfg, args.steps,
                                                                        warmup=min(5, args.steps // 2))
    print_results(results, args.json)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="performance benchmarks",
                                  description="Performance benchmarks; record results in docs/BENCHMARKS.md.")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="{synth,loader}")
    p = sub.add_parser("synth", help="synthetic session generation speed",
                       description="Sessions/s of the synthetic world: rendering alone in one process, and end "
                                   "to end (render, encode, shard, index) with 1 and --workers processes.")
    p.add_argument("--sessions", type=int, default=512)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_arguments(p)
    p.set_defaults(func=bench_synth)

    p = sub.add_parser("loader", help="data loader speed: DALI against PIL, local and S3; data wait in training",
                       description="Sessions/s and images/s (images and masks decoded) of reading sessions (ranged "
                                   "read, parse, decode to the bucket) with DALI and with the PIL reference at the "
                                   "same thread count, from local disk and from an S3 server (moto, started in its "
                                   "own process on 127.0.0.1); best of --repeats interleaved passes. Then the share of step time "
                                   "`tiny` training waits for data (--steps steps, one process, --workers loader "
                                   "processes, 32x32 PNG sessions as in `make demo`).")
    p.add_argument("--sessions", type=int, default=64, help="sessions to read per pass (default 64)")
    p.add_argument("--resolution", type=int, default=256, help="source frame size (default 256)")
    p.add_argument("--bucket", type=int, default=128, help="decoded size, data.resolution (default 128)")
    p.add_argument("--image-format", choices=["jpg", "png"], default="jpg")
    p.add_argument("--threads", type=int, default=2, help="decode threads, DALI and PIL alike (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="passes per decoder and source (default 3)")
    p.add_argument("--steps", type=int, default=40, help="tiny training steps; 0: skip (default 40)")
    p.add_argument("--tiny-sessions", type=int, default=512, help="sessions of the tiny training data")
    p.add_argument("--workers", type=int, default=1, help="loader processes in tiny training (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_arguments(p)
    p.set_defaults(func=bench_loader)
