"""Arguments every config-driven command shares: `--config PRESET|PATH` and trailing `key.sub=value` overrides."""

from __future__ import annotations

import argparse

from vincie.config import Config, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", metavar="PRESET|YAML",
                        help="config preset name (launch/configs/NAME.yaml) or YAML path (default: tiny)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. storage.s3_endpoint_url=http://127.0.0.1:9000")


def config_from_args(args: argparse.Namespace, extra: list[str] | None = None) -> Config:
    """The resolved config: preset or file, then the command's own flags, then explicit overrides."""
    return load_config(args.config, [*(extra or []), *args.overrides])
