"""What limits the tiny preset's editing quality: widths, batch sizes and turn curricula of the tiny recipe trained
side by side on one GPU for the same wall-clock budget, then scored by the strict synthetic judge.

Every arm trains `vincie train --config tiny` with its overrides on the same data (the compute ablation's: 8192
training sessions of seed 0, 64 test sessions of 5 turns, `vincie ablate`'s layout under WORK/data), PIL decoding
and SDPA attention (the GPU image has no DALI; SDPA avoids flex's compilation per sequence length). All arms run at
once on one device, so each gets a share of it: compare arms of one call, not step times across calls. At the
budget each is stopped with SIGTERM (the trainer writes a checkpoint), then `vincie eval --bench synth --json`
scores its EMA weights. Results: OUT/quality.json and a table (steps reached, samples seen, success per turn).

    PYTHONPATH=. python3 bench/gpu/quality.py --out $OUT                       # the width/batch set, 330 s
    PYTHONPATH=. python3 bench/gpu/quality.py --out $OUT --set curriculum --budget-s 190
    python bench/gpu/quality.py --out /tmp/q --arms h64 --max-steps 2 --sessions 16 --test-sessions 2  # CPU check

On the lent GPU machines megatron-core, webdataset, braceexpand, nvtx and optree travel as wheels (docs/operations.md,
"The GPU path"). Figures: docs/BENCHMARKS.md, "What limits the tiny preset".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

W256 = ("model.hidden_size=256", "model.text_dim=256")
EARLY = "data.turn_curriculum={0: 2, 800: 5}"
SETS = {
    "width-batch": {
        "h64": (),  # the tiny preset as it is
        "h128": ("model.hidden_size=128", "model.text_dim=128"),
        "h256": W256,
        "h256-l10": (*W256, "model.num_layers=10"),
        "h256-b32": (*W256, "train.batch_size=32"),
        "h512": ("model.hidden_size=512", "model.text_dim=512", "model.num_heads=8", "train.lr=0.001"),
    },
    "curriculum": {
        "h256-b32-c800": (*W256, "train.batch_size=32", EARLY),
        "h256-b32-c0": (*W256, "train.batch_size=32", "data.turn_curriculum={0: 5}"),
        "h128-b32-c800": ("model.hidden_size=128", "model.text_dim=128", "train.batch_size=32", EARLY),
        "h64-b32-c800": ("train.batch_size=32", EARLY),
        "h256-b64-c800": (*W256, "train.batch_size=64", EARLY),
    },
}


def vincie(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vincie", *args], **kwargs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where quality.json goes")
    parser.add_argument("--work", default="/tmp/vincie-quality", help="data, runs and logs (default %(default)s)")
    parser.add_argument("--set", choices=SETS, default="width-batch", help="the arms (default %(default)s)")
    parser.add_argument("--arms", help="comma-separated arm names of any set instead of --set")
    parser.add_argument("--budget-s", type=float, default=330.0, help="wall-clock training seconds per arm")
    parser.add_argument("--max-steps", type=int, default=200_000, help="train.steps (a CPU check ends by it)")
    parser.add_argument("--sessions", type=int, default=8192, help="distinct training sessions")
    parser.add_argument("--test-sessions", type=int, default=64, help="test sessions of 5 turns")
    args = parser.parse_args()
    every = {name: o for arms in SETS.values() for name, o in arms.items()}
    arms = {name: every[name] for name in args.arms.split(",")} if args.arms else SETS[args.set]
    os.makedirs(args.out, exist_ok=True)

    from vincie.config import load_config
    from vincie.ops.ablate import Runner

    runner = Runner("compute", args.work, "tiny", [], seeds=1, steps=None, sessions=args.sessions, nproc=1)
    test = runner.synth(os.path.join(args.work, "data", "test"), args.test_sessions, "test", 0, (5, 5))
    train = runner.synth(os.path.join(args.work, "data", f"train-{args.sessions}-s0"), args.sessions, "train", 0,
                         (2, 6))
    common = [f"data.train_url={train}", f"data.eval_url={test}", "data.decoder=pil", "data.workers=2",
              "model.attention_backend=sdpa", f"train.steps={args.max_steps}", "train.checkpoint_every=100000",
              "train.keep_checkpoints=1", "run.seed=0"]
    run_dir = {name: os.path.join(args.work, "runs", name) for name in arms}
    os.makedirs(os.path.join(args.work, "runs"), exist_ok=True)
    training = {name: vincie("train", "--config", "tiny", "--no-progress", f"run.out_dir={run_dir[name]}", *common,
                             *overrides, stdout=open(run_dir[name] + ".log", "w"), stderr=subprocess.STDOUT)
                for name, overrides in arms.items()}
    start = time.time()
    while time.time() - start < args.budget_s and any(p.poll() is None for p in training.values()):
        time.sleep(2)
    for p in training.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # the trainer finishes its step and writes a checkpoint
    failed = [name for name, p in training.items() if p.wait() != 0]
    if failed:
        print(f"quality: training {', '.join(failed)} failed; see {args.work}/runs/NAME.log", file=sys.stderr)
        return 1

    scoring = {name: vincie("eval", "--bench", "synth", "--model", run_dir[name], "--data", test, "--out",
                            os.path.join(args.work, "eval", name), "--sessions", str(args.test_sessions), "--turns",
                            "5", "--json", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
               for name in arms}
    results = {"device": device_name(), "budget_s": args.budget_s, "arms": {}}
    print(f"{'arm':15s}{'steps':>7s}{'samples':>9s}{'step s':>8s}" + "".join(f"{'turn ' + str(k):>8s}"
                                                                          for k in range(1, 6)))
    for name, p in scoring.items():
        report = json.loads(p.communicate()[0])
        records = [json.loads(line) for line in open(os.path.join(run_dir[name], "metrics.jsonl"))
                   if '"step_s"' in line]
        batch = load_config(os.path.join(run_dir[name], "config.yaml")).train.batch_size
        arm = {"overrides": list(arms[name]), "steps": records[-1]["step"], "samples": records[-1]["step"] * batch,
               "step_s": records[-1]["step_s"], "success": report["success"], "interval": report["interval"]}
        results["arms"][name] = arm
        print(f"{name:15s}{arm['steps']:7d}{arm['samples']:9d}{arm['step_s']:8.3f}"
              + "".join(f"{s:8.2f}" for s in arm["success"]), flush=True)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
