"""`vincie bench ...`: performance benchmarks. Figures go to docs/BENCHMARKS.md with the command and machine."""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from vincie.cli_common import add_config_arguments, config_from_args


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
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for key, value in results.items():
            print(f"{key:36s} {value:.1f}" if isinstance(value, float) else f"{key:36s} {value}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="performance benchmarks",
                                  description="Performance benchmarks; record results in docs/BENCHMARKS.md.")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="{synth}")
    p = sub.add_parser("synth", help="synthetic session generation speed",
                       description="Sessions/s of the synthetic world: rendering alone in one process, and end "
                                   "to end (render, encode, shard, index) with 1 and --workers processes.")
    p.add_argument("--sessions", type=int, default=512)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_arguments(p)
    p.set_defaults(func=bench_synth)
