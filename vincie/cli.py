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
               *(["--no-progress"] if args.no_progress else []), *args.overrides]
    print("launch: " + " ".join(command[2:]), flush=True)
    return subprocess.call(command)


def cmd_edit(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from vincie.inference import Editor, load_image, load_run_config
    from vincie.strip import strip_png

    image, size = load_image(args.image, load_run_config(args.model).data.resolution)  # bad input fails fast
    editor = Editor.from_run(args.model, use_ema=not args.raw_weights)
    results = editor.edit([image], [args.instruction], steps=args.steps, cfg_scale=args.cfg, seed=args.seed,
                          chain_masks=args.chain_masks)[0]
    os.makedirs(args.out, exist_ok=True)
    for k, result in enumerate(results, start=1):
        path = os.path.join(args.out, f"turn-{k:02d}.png")
        Image.fromarray(result.image).resize(size, Image.BICUBIC).save(path)
        if result.cur_mask is not None:
            for name, mask in (("cur", result.cur_mask), ("next", result.next_mask)):
                Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST).save(
                    os.path.join(args.out, f"turn-{k:02d}-{name}-mask.png"))
    with open(os.path.join(args.out, "strip.png"), "wb") as f:
        f.write(strip_png(image, [r.image for r in results], args.instruction))
    print(f"edit: {len(results)} turns -> {args.out}/turn-*.png, {args.out}/strip.png")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vincie.evaluate import evaluate_synth, format_table
    from vincie.inference import Editor

    editor = Editor.from_run(args.model, use_ema=not args.raw_weights)
    data = args.data or editor.cfg.data.eval_url
    report = evaluate_synth(editor, data, args.out, sessions=args.sessions, turns=args.turns, steps=args.steps,
                            cfg_scale=args.cfg, seed=args.seed)
    print(format_table(report))
    print(f"eval: {report['sessions']} sessions; report {args.out}/report.json, pictures {args.out}/grid.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from data_index import cli as data_cli
    from vincie import bench

    parser = argparse.ArgumentParser(
        prog="vincie",
        description="vincie: train in-context multi-turn image editing from video (after VINCIE, arXiv 2506.10941).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{config,data,train,launch,edit,eval,bench}")

    config = sub.add_parser("config", help="show a resolved, validated config",
                            description="Load a preset or YAML file, apply overrides, validate, print the result.")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="{show}")
    show = csub.add_parser("show", help="print the resolved config as YAML")
    add_config_arguments(show)
    show.set_defaults(func=cmd_config_show)

    data_cli.register(sub)

    edit = sub.add_parser("edit", help="edit an image turn by turn with a trained model",
                          description="Apply instructions one after another; each output is the next turn's "
                                      "input. Writes turn-NN.png per turn and strip.png.")
    edit.add_argument("--model", required=True, metavar="DIR", help="training run directory (config.yaml, checkpoints/)")
    edit.add_argument("--image", required=True, metavar="PATH")
    edit.add_argument("--instruction", required=True, action="append", metavar="TEXT",
                      help="one per turn; repeat for several turns")
    edit.add_argument("--out", required=True, metavar="DIR")
    edit.add_argument("--steps", type=int, help="Euler steps (default: diffusion.sample_steps)")
    edit.add_argument("--cfg", type=float, help="text guidance scale (default: diffusion.cfg_scale)")
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--chain-masks", action="store_true", help="generate current mask, next mask, then image")
    edit.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    edit.set_defaults(func=cmd_edit)

    evaluate = sub.add_parser("eval", help="multi-turn editing benchmark",
                              description="Edit held-out sessions turn by turn and score them (see vincie/evaluate.py "
                                          "for the judge). Writes report.json and grid.png.")
    evaluate.add_argument("--model", required=True, metavar="DIR")
    evaluate.add_argument("--bench", default="synth", choices=["synth"], help="benchmark (default synth)")
    evaluate.add_argument("--data", metavar="URL", help="held-out sessions (default: the run's data.eval_url)")
    evaluate.add_argument("--out", required=True, metavar="DIR")
    evaluate.add_argument("--sessions", type=int, default=32)
    evaluate.add_argument("--turns", type=int, default=5)
    evaluate.add_argument("--steps", type=int)
    evaluate.add_argument("--cfg", type=float)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    evaluate.set_defaults(func=cmd_eval)

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
    local = lsub.add_parser("local", help="torchrun on this machine (gloo on CPU, NCCL on GPUs)",
                            description="Run `vincie train` under torchrun with N processes on this machine, the "
                                        "same entry point as on Kubernetes. The layout comes from the config: "
                                        "parallel.tensor, parallel.pipeline, ...; data parallel takes the rest.")
    local.add_argument("--nproc", type=int, required=True, metavar="N", help="processes")
    local.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a failure")
    local.add_argument("--no-progress", action="store_true", help="no progress bar")
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
