"""The `vincie` command line. Bad input ends with one line on stderr naming what was wrong, and exit status 2."""

from __future__ import annotations

import argparse
import sys

from vincie.cli_common import add_config_arguments, config_from_args
from vincie.config import to_yaml
from vincie.errors import VincieError


def cmd_config_show(args: argparse.Namespace) -> int:
    print(to_yaml(config_from_args(args)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from data_index import cli as data_cli
    from vincie import bench

    parser = argparse.ArgumentParser(
        prog="vincie",
        description="vincie: train in-context multi-turn image editing from video (after VINCIE, arXiv 2506.10941).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{config,data,bench}")

    config = sub.add_parser("config", help="show a resolved, validated config",
                            description="Load a preset or YAML file, apply overrides, validate, print the result.")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="{show}")
    show = csub.add_parser("show", help="print the resolved config as YAML")
    add_config_arguments(show)
    show.set_defaults(func=cmd_config_show)

    data_cli.register(sub)
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
