"""The `vincie` command line. Bad input ends with one line on stderr naming what was wrong, and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys

from vincie.cli_common import add_config_arguments, config_from_args
from vincie.config import to_yaml
from vincie.errors import VincieError


def cmd_config_show(args: argparse.Namespace) -> int:
    print(to_yaml(config_from_args(args)), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vincie.parallel import shutdown
    from vincie.train import train

    cfg = config_from_args(args)
    try:
        summary = train(cfg, progress=not args.no_progress)
    finally:
        shutdown()
    if summary and int(os.environ.get("RANK", "0")) == 0:
        print("train: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if isinstance(v, float)))
    return 0


def cmd_launch_local(args: argparse.Namespace) -> int:
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               f"--max-restarts={args.max_restarts}", "-m", "vincie", "train", "--config", args.config,
               *args.overrides]
    print("launch: " + " ".join(command[2:]), flush=True)
    return subprocess.call(command)


def build_parser() -> argparse.ArgumentParser:
    from data_index import cli as data_cli
    from vincie import bench

    parser = argparse.ArgumentParser(
        prog="vincie",
        description="vincie: train in-context multi-turn image editing from video (after VINCIE, arXiv 2506.10941).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{config,data,train,launch,bench}")

    config = sub.add_parser("config", help="show a resolved, validated config",
                            description="Load a preset or YAML file, apply overrides, validate, print the result.")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="{show}")
    show = csub.add_parser("show", help="print the resolved config as YAML")
    add_config_arguments(show)
    show.set_defaults(func=cmd_config_show)

    data_cli.register(sub)

    train = sub.add_parser("train", help="train the MM-DiT (single process, or one rank under torchrun)",
                           description="Train on the shards of data.train_url. Writes run.out_dir/config.yaml, "
                                       "metrics.jsonl and checkpoints/, and resumes from the latest checkpoint "
                                       "there automatically.")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_arguments(train)
    train.set_defaults(func=cmd_train)

    launch = sub.add_parser("launch", help="launch training processes",
                            description="Launch `vincie train` as several processes.")
    lsub = launch.add_subparsers(dest="launch_command", required=True, metavar="{local}")
    local = lsub.add_parser("local", help="torchrun on this machine (data parallel; gloo on CPU)",
                            description="Run `vincie train` under torchrun with N processes on this machine, the "
                                        "same entry point as on Kubernetes.")
    local.add_argument("--nproc", type=int, required=True, metavar="N", help="processes")
    local.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a failure")
    add_config_arguments(local)
    local.set_defaults(func=cmd_launch_local)
    bench.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VincieError as exc:
        print(f"vincie: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vincie: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
