"""The `vincie` command line. Bad input ends with one line on stderr naming what was wrong, and exit status 2."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys

from vincie.config import add_config_arguments, config_from_args, to_yaml
from vincie.errors import VincieError
from vincie.gpus import CARDS


def cmd_config_show(args: argparse.Namespace) -> int:
    print(to_yaml(config_from_args(args)), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vincie.evaluation.validation import Validator
    from vincie.training.parallel import shutdown
    from vincie.training.train import train

    cfg = config_from_args(args)
    try:
        summary = train(cfg, progress=not args.no_progress, make_validator=Validator)
    finally:
        shutdown()
    if summary and int(os.environ.get("RANK", "0")) == 0:
        print("train: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if isinstance(v, float)))
    return summary.get("exit_code", 0)


def cmd_launch_local(args: argparse.Namespace) -> int:
    import signal
    import subprocess

    import psutil

    config_from_args(args)  # a bad config or override: one error here, not one per rank under torchrun
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               f"--max-restarts={args.max_restarts}", "-m", "vincie", "train", "--config", args.config,
               *(["--no-progress"] if args.no_progress else []), *args.overrides]
    print("launch: " + " ".join(command[2:]), flush=True)
    torchrun = subprocess.Popen(command)

    def stop(signum, frame):
        """SIGTERM goes to the training processes themselves (torchrun's children): they finish their step, write
        a checkpoint and exit 0, and torchrun with them. Passed to torchrun, it would stop them the same way but
        exit with an error for its own signal."""
        for worker in psutil.Process(torchrun.pid).children():
            worker.send_signal(signal.SIGTERM)
        print("launch: SIGTERM passed to the training processes: they stop after this step with a checkpoint",
              flush=True)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return torchrun.wait()
    except KeyboardInterrupt:  # Ctrl-C reached torchrun too, which stops its workers at once
        return torchrun.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_k8s(args: argparse.Namespace) -> int:
    from vincie.ops import k8s

    cfg = config_from_args(args)
    if args.k8s_command == "render":
        text = k8s.to_text(k8s.render(cfg, monitoring=args.monitoring))
        if args.out:
            from vincie import storage

            storage.write_bytes_atomic(args.out, text.encode())
            print(f"k8s: manifests -> {args.out} (apply: kubectl apply -f {args.out}, or vincie k8s submit)")
        else:
            print(text, end="")
    elif args.k8s_command == "submit":
        print(f"k8s: submitted {k8s.submit(cfg)} in namespace {cfg.k8s.namespace}")
    elif args.k8s_command == "status":
        print(k8s.status(cfg))
    elif args.k8s_command == "logs":
        print(k8s.logs(cfg, args.pod, args.tail), end="")
    else:
        print("k8s: deleted " + ", ".join(k8s.cancel(cfg)))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from vincie.ops.ablate import Runner, format_results

    runner = Runner(args.name, args.out or os.path.join("runs", "ablate"), args.config, args.overrides, args.seeds,
                    args.steps, args.sessions, args.nproc, args.test_sessions, args.turns, args.parallel)
    results = runner.run()
    print(format_results(results))
    where = os.path.join(runner.out, args.name)
    print(f"ablate {args.name}: results {where}/results.json, plot {where}/ablation.png")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from vincie.ops.report import write_report

    out = write_report(args.run_dir, args.out)
    print(f"report: {out}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from vincie import storage
    from vincie.inference.editor import Editor, load_config, load_image, restore_size
    from vincie.inference.strip import strip_png

    cfg = load_config(args.model)
    if cfg.sequence.mode == "release":  # the release's image handling: aspect kept, later images at the first's size
        multiple = cfg.vae.factor * cfg.model.patch_size
        image, size = load_image(args.image[0], cfg.data.resolution, multiple)  # bad input fails fast
        inputs = [image] + [load_image(path, cfg.data.resolution, multiple, size)[0] for path in args.image[1:]]
    elif len(args.image) > 1:
        raise VincieError(f"--image given {len(args.image)} times: only release-mode models (sequence.mode release) "
                          "take several input images")
    else:
        image, size = load_image(args.image[0], cfg.data.resolution)
        inputs = image
    editor = Editor.load(args.model, raw_weights=args.raw_weights, kv_cache=not args.no_kv_cache)
    results = editor.edit([inputs], [args.instruction], steps=args.steps, cfg_scale=args.cfg, seed=args.seed,
                          chain_masks=args.chain_masks)[0]
    os.makedirs(args.out, exist_ok=True)

    def save(picture, name: str, mask: bool = False) -> None:
        buffer = io.BytesIO()
        restore_size(picture, size, mask).save(buffer, format="PNG")
        storage.write_bytes_atomic(os.path.join(args.out, name), buffer.getvalue())

    for k, result in enumerate(results, start=1):
        save(result.image, f"turn-{k:02d}.png")
        if result.cur_mask is not None:
            save(result.cur_mask, f"turn-{k:02d}-cur-mask.png", mask=True)
            save(result.next_mask, f"turn-{k:02d}-next-mask.png", mask=True)
    storage.write_bytes_atomic(os.path.join(args.out, "strip.png"),
                               strip_png(image, [r.image for r in results], args.instruction))
    masks = ", turn-*-{cur,next}-mask.png" if args.chain_masks else ""
    print(f"edit: {len(results)} turns -> {args.out}/turn-*.png{masks}, {args.out}/strip.png")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vincie.inference.export import export

    config = export(args.checkpoint, args.out, weights=args.weights, dtype=args.dtype, overwrite=args.overwrite)
    source = config["source"]
    print(f"export: step {source['step']} ({args.weights} weights, {args.dtype}, {config['parameters']:,} "
          f"MM-DiT parameters) -> {args.out}/model.safetensors, config.json, README.md")
    return 0


def cmd_convert_release(args: argparse.Namespace) -> int:
    from vincie.inference.convert import convert_release

    if args.out is None and args.check is None:
        raise VincieError("vincie convert release: nothing to do (give --out DIR, --check FIXTURE_DIR or both)")
    config, results = convert_release(args.dit, args.release_config, config_from_args(args), args.out, args.check,
                                      args.dtype, args.tolerance, args.overwrite, args.vae)
    for case, error, relative, ok in results:
        print(f"check: {case:<12} max abs error {error:.3g}, relative {relative:.3g} "
              f"{'ok' if ok else f'ABOVE the tolerance {args.tolerance:g}'}")
    if config is not None:
        print(f"convert: {config['parameters']:,} MM-DiT parameters ({args.dtype}) -> {args.out}/model.safetensors, "
              f"config.json, README.md{', vae/ (fp32)' if args.vae else ''}")
    return 0 if all(ok for *_, ok in results) else 1


# `vincie eval` options that need a model (not --predictions)
MODEL_OPTIONS = ("steps", "cfg", "chain_masks", "given_truth", "raw_weights", "save_predictions", "context")


def cmd_eval(args: argparse.Namespace) -> int:
    from vincie.inference.editor import Editor, load_config

    if args.bench == "synth":
        if args.judge_url or args.clip_model or args.dino_model:
            raise VincieError("--bench synth is scored by its exact judge; --judge-url, --clip-model and "
                              "--dino-model apply to mse-bench and magicbrush")
        if bool(args.model) == bool(args.predictions):
            raise VincieError("--bench synth scores either a model's edits (--model DIR) or saved ones "
                              "(--predictions DIR): give exactly one")
        if args.predictions:
            given = [f"--{name.replace('_', '-')}" for name in MODEL_OPTIONS if getattr(args, name)]
            if given:
                raise VincieError(f"{', '.join(given)} need --model; --predictions scores saved edits")
            if not args.data:
                raise VincieError("--predictions needs --data URL (the held-out sessions the edits were made from)")
    else:
        if args.predictions or args.save_predictions or args.json:
            raise VincieError("--predictions, --save-predictions and --json apply to --bench synth only")
        if not args.model:
            raise VincieError(f"--bench {args.bench} needs --model DIR")
        if args.given_truth:
            raise VincieError("--given-truth applies to --bench synth only (its sessions hold every turn's true image)")
        if args.context:
            raise VincieError("--context applies to --bench synth only")
        if not args.data:
            raise VincieError(f"--bench {args.bench} needs --data DIR (a local copy of the benchmark)")
    if args.judge_url and not args.judge_model:
        raise VincieError("--judge-url needs --judge-model (the model name the endpoint serves)")
    editor = None
    if args.model:
        load_config(args.model)  # a bad --model fails before anything loads
        editor = Editor.load(args.model, raw_weights=args.raw_weights)
    if args.bench == "synth":
        from vincie.evaluation.evaluate import evaluate_synth, format_table

        report = evaluate_synth(editor, args.data or editor.cfg.data.eval_url, args.out,
                                sessions=args.sessions or 32, turns=args.turns, steps=args.steps, cfg_scale=args.cfg,
                                seed=args.seed, chain_masks=args.chain_masks, given_truth=args.given_truth,
                                predictions=args.predictions or "", save_predictions_to=args.save_predictions or "",
                                storage_cfg=editor.cfg.storage if editor else None,
                                context=args.context or "session")
        if args.json:
            print(json.dumps({"bench": "synth", "sessions": report["sessions"], "turns": report["turns"],
                              "success": report["success"]["model"], "interval": report["success_interval"]["model"],
                              "ground_truth": report["success"]["ground_truth"],
                              "copy_input": report["success"]["copy_input"],
                              "report": os.path.join(args.out, "report.json")}))
            return 0
        print(format_table(report))
    else:
        from vincie.evaluation.evaluate import evaluate_benchmark, format_benchmark_table
        from vincie.evaluation.judge import VLMJudge

        judge = VLMJudge(args.judge_url, args.judge_model, args.judge_api_key_env) if args.judge_url else None
        report = evaluate_benchmark(editor, args.bench, args.data, args.out, sessions=args.sessions,
                                    steps=args.steps, cfg_scale=args.cfg, seed=args.seed, chain_masks=args.chain_masks,
                                    clip_model=args.clip_model,
                                    dino_model=args.dino_model, judge=judge)
        print(format_benchmark_table(report))
    print(f"eval: {report['sessions']} sessions; report {args.out}/report.json, pictures {args.out}/grid.png")
    return 0


def register_plan(sub) -> None:
    p = sub.add_parser("plan", help="memory and step time of TP/PP/DP layouts on N GPUs, and the best one",
                       description="Estimate per-GPU memory (weights, optimizer, activations with and without "
                                   "recomputation) and step time of every tensor x pipeline x data-parallel layout "
                                   "of a config on --gpus GPUs, from the model FLOPs (vincie.model.flops), the "
                                   "GPU's peak rate and link bandwidths; print a ranked table, the assumptions, "
                                   "and the recommended layout as config overrides for `vincie train` / "
                                   "`vincie k8s render`. Exits 1 when no layout fits.")
    p.add_argument("--config", "--preset", dest="config", default="3b", metavar="PRESET|YAML",
                   help="config preset or YAML path (default: 3b)")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu", default="h100", choices=list(CARDS),
                   help="GPU card (vincie/gpus.py): sets the defaults below (printed with the plan)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, help="dense peak TFLOP/s per GPU at train.precision, for compute "
                                                      "time and MFU (default: the card's datasheet figure)")
    p.add_argument("--memory-gib", type=float, help="memory per GPU (default: the GPU kind's)")
    p.add_argument("--nvlink-gbs", type=float, help="NVLink GB/s per GPU and direction (default: the kind's)")
    p.add_argument("--network-gbs", type=float, help="inter-node GB/s per GPU (default: the kind's)")
    p.add_argument("--efficiency", type=float, default=0.5, help="share of peak the GEMMs reach (default 0.5)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. "
                                                                          "train.batch_size=512")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from vincie.config import load_config
    from vincie.ops.plan import plan

    cfg = load_config(args.config, args.overrides)
    card = CARDS[args.gpu]
    gpu = dataclasses.replace(card, memory_gib=args.memory_gib or card.memory_gib,
                              nvlink_gbs=args.nvlink_gbs or card.nvlink_gbs,
                              network_gbs=args.network_gbs or card.network_gbs)
    if args.peak_tflops:
        gpu = gpu.with_peak(cfg.train.precision, args.peak_tflops)
    report, status = plan(cfg, args.gpus, gpu, args.gpus_per_node, args.efficiency)
    print(report)
    return status


def build_parser() -> argparse.ArgumentParser:
    from data_index import cli as data_cli
    from vincie.cli import bench

    parser = argparse.ArgumentParser(
        prog="vincie",
        description="vincie: train in-context multi-turn image editing from video (after VINCIE, arXiv 2506.10941).")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{config,data,train,launch,k8s,report,export,convert,edit,eval,bench,plan}")

    config = sub.add_parser("config", help="show a resolved, validated config",
                            description="Load a preset or YAML file, apply overrides, validate, print the result.")
    csub = config.add_subparsers(dest="config_command", required=True, metavar="{show}")
    show = csub.add_parser("show", help="print the resolved config as YAML")
    add_config_arguments(show)
    show.set_defaults(func=cmd_config_show)

    data_cli.register(sub)

    export = sub.add_parser("export", help="turn a training checkpoint into an inference model directory",
                            description="Read a training checkpoint of any tensor/pipeline-parallel layout (a run "
                                        "directory's latest, or one checkpoints/step-N directory) and write one "
                                        "model.safetensors with the whole weights, config.json (dimensions, latent "
                                        "and text encoder, sampler defaults) and a model card README.md into --out "
                                        "(written to a temporary directory, then renamed). The result loads with "
                                        "plain PyTorch and safetensors: no megatron-core, nothing unpickled.")
    export.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="training run directory (its latest checkpoint) or a checkpoints/step-N directory")
    export.add_argument("--out", required=True, metavar="DIR")
    export.add_argument("--weights", default="ema", choices=["ema", "raw"], help="EMA (default) or raw weights")
    export.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="stored precision (default fp32; bf16 halves the file, inference upcasts to fp32)")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.set_defaults(func=cmd_export)

    convert = sub.add_parser("convert", help="convert other systems' models to vincie's",
                             description="Convert another system's model into a vincie model directory.")
    convsub = convert.add_subparsers(dest="convert_command", required=True, metavar="{release}")
    release = convsub.add_parser(
        "release", help="the released VINCIE DiT -> a vincie model directory",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert the released VINCIE DiT (ByteDance-Seed/VINCIE: its dit.pth and its YAML config; "
                    "its VAE with --vae) into a vincie model directory (model.safetensors, config.json, "
                    "README.md: what `vincie export` writes), read without unpickling code. Every release key "
                    "must find its place and every vincie parameter must be given, or it stops naming the key.\n\n"
                    "The model section comes from the release's config; the text encoder, resolution and "
                    "sampler from --config and its overrides (default: the 3b preset), and so does the VAE unless "
                    "--vae converts the release's.\n\n"
                    "--check FIXTURE_DIR compares the converted model with outputs of the release's own code "
                    "(docs/release.md, 'Fixtures': make them on a GPU with tools/release_fixtures.py or your own "
                    "script) and exits 1 when any case is above --tolerance.\n\n"
                    "example: vincie convert release --dit ckpt/VINCIE-3B/dit.pth --release-config "
                    "VINCIE/configs/generate.yaml --vae ckpt/VINCIE-3B/vae.pth --out models/vincie-3b "
                    "text_encoder.path=/models/llm14b")
    release.add_argument("--dit", required=True, metavar="PTH", help="the release's DiT weights (dit.pth)")
    release.add_argument("--vae", metavar="PTH",
                         help="the release's VAE weights (3B: vae.pth, 7B: ema_vae.pth): converted to its "
                              "single-image 2D network and written into the model directory (DIR/vae/, vae.kind "
                              "release); without it the model uses the VAE its config names")
    release.add_argument("--release-config", required=True, metavar="YAML",
                         help="the release's config (configs/generate.yaml for the 3B)")
    release.add_argument("--out", metavar="DIR", help="the model directory to write (written to a temporary "
                                                      "directory, then renamed)")
    release.add_argument("--check", metavar="FIXTURE_DIR",
                         help="compare with a fixture directory's outputs (cases.safetensors, and "
                              "vae_cases.safetensors with --vae); exit 1 above --tolerance")
    release.add_argument("--tolerance", type=float, default=1e-4,
                         help="largest relative error --check accepts: max |error| / max |release output| "
                              "(default 1e-4, fp32)")
    release.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="stored precision")
    release.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_config_arguments(release, default="3b")
    release.set_defaults(func=cmd_convert_release)

    edit = sub.add_parser("edit", help="edit an image turn by turn with a trained model",
                          description="Apply instructions one after another; each output is the next turn's "
                                      "input. The image may have any size: it is resized to the model's square "
                                      "resolution and every output is restored to the input's size. Writes "
                                      "turn-NN.png per turn, strip.png, and turn-NN-{cur,next}-mask.png with "
                                      "--chain-masks.")
    edit.add_argument("--model", required=True, metavar="DIR",
                      help="an exported model (vincie export) or a training run directory (config.yaml, checkpoints/)")
    edit.add_argument("--image", required=True, action="append", metavar="PATH",
                      help="the image to edit; release-mode models take several (repeat it): a session of input "
                           "images for multi-image composition, refer to them as <IMG0>, <IMG1>, ...")
    edit.add_argument("--instruction", required=True, action="append", metavar="TEXT",
                      help="one per turn; repeat for several turns")
    edit.add_argument("--out", required=True, metavar="DIR")
    edit.add_argument("--steps", type=int, help="Euler steps (default: diffusion.sample_steps)")
    edit.add_argument("--cfg", type=float, help="text guidance scale (default: diffusion.cfg_scale)")
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--chain-masks", action="store_true", help="generate current mask, next mask, then image")
    edit.add_argument("--raw-weights", action="store_true",
                      help="training run directory: use the raw weights instead of the EMA")
    edit.add_argument("--no-kv-cache", action="store_true",
                      help="recompute the whole sequence at every step (same result, slower; for comparison)")
    edit.set_defaults(func=cmd_edit)

    evaluate = sub.add_parser("eval", help="multi-turn editing benchmarks",
                              description="Edit benchmark sessions turn by turn (each output is the next turn's "
                                          "input) and score them. synth: held-out synthetic sessions and a strict "
                                          "judge that checks every object of the world's true next state, the "
                                          "background and the edited region (vincie/evaluation/synth_judge.py); its "
                                          "edits come from --model or from saved images (--predictions), so any "
                                          "editor is scored by the same judge. mse-bench (5 turns) and magicbrush "
                                          "(up to 3): local copies in their published formats "
                                          "(vincie/evaluation/eval_sets.py); L1 against ground truth where there is "
                                          "one, CLIP-I / DINO / CLIP-T with local transformers model directories, and "
                                          "MSE-Bench's rule with a VLM judge behind any OpenAI-compatible chat "
                                          "endpoint (vincie/evaluation/judge.py). Prints a per-turn table; writes "
                                          "report.json and grid.png.")
    evaluate.add_argument("--model", metavar="DIR", help="an exported model or a training run directory (needed "
                                                           "unless --bench synth --predictions)")
    evaluate.add_argument("--predictions", metavar="DIR",
                          help="synth, without a model: score saved edits DIR/<session key>/turn-01.png .. "
                               "turn-K.png, each at the session's own resolution (needs --data)")
    evaluate.add_argument("--save-predictions", metavar="DIR",
                          help="synth, with --model: also write the model's edits in the --predictions layout")
    evaluate.add_argument("--json", action="store_true",
                          help="synth: print one JSON object instead of the table; its success is the list of "
                               "cumulative success per turn (the table's model row)")
    evaluate.add_argument("--bench", default="synth", choices=["synth", "mse-bench", "magicbrush"],
                          help="benchmark (default synth)")
    evaluate.add_argument("--data", metavar="URL|DIR",
                          help="synth: held-out sessions (default: the run's data.eval_url); mse-bench: a directory "
                               "of its parquet files; magicbrush: its test/ directory (edit_sessions.json, images/)")
    evaluate.add_argument("--out", required=True, metavar="DIR")
    evaluate.add_argument("--sessions", type=int, help="at most this many sessions (default: synth 32, others all)")
    evaluate.add_argument("--turns", type=int, default=5, help="synth: turns per session (default 5)")
    evaluate.add_argument("--steps", type=int)
    evaluate.add_argument("--cfg", type=float)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--chain-masks", action="store_true",
                          help="each turn generates its current mask, next mask, then the image (CS -> NS -> I)")
    evaluate.add_argument("--context", choices=["session", "current"],
                          help="synth: what each turn sees: the whole session so far (default), or the current "
                               "image and the turn's instruction only (the paper's context ablation)")
    evaluate.add_argument("--given-truth", action="store_true",
                          help="synth: also edit each turn from the true previous image (teacher forcing, as in "
                               "training) and print that success per turn and per edit kind: what the model does at "
                               "a turn, without the drift of its own earlier edits (twice the editing time)")
    evaluate.add_argument("--raw-weights", action="store_true",
                          help="training run directory: use the raw weights instead of the EMA")
    evaluate.add_argument("--clip-model", default="", metavar="DIR",
                          help="local transformers CLIP directory: CLIP-I and CLIP-T")
    evaluate.add_argument("--dino-model", default="", metavar="DIR", help="local transformers DINO ViT directory: DINO")
    evaluate.add_argument("--judge-url", default="", metavar="URL",
                          help="OpenAI-compatible endpoint base, e.g. http://host:8000/v1 (POST .../chat/completions)")
    evaluate.add_argument("--judge-model", default="", metavar="NAME", help="the judge model's name at that endpoint")
    evaluate.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                          help="environment variable holding the endpoint's API key, if it needs one "
                               "(default OPENAI_API_KEY)")
    evaluate.set_defaults(func=cmd_eval)

    train = sub.add_parser("train", help="train the MM-DiT (single process, or one rank under torchrun)",
                           description="Train on the shards of data.train_url. Writes run.out_dir/config.yaml, "
                                       "metrics.jsonl and checkpoints/, and resumes from the latest checkpoint "
                                       "there automatically. Progress (on stderr): a bar on a terminal, else one "
                                       "line per train.log_every steps. SIGTERM (e.g. Kubernetes preempting the "
                                       "pod) stops the run after the step in progress with a checkpoint, exit "
                                       "status 0; rerunning the same command resumes it. Ctrl-C stops at once.")
    train.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    add_config_arguments(train)
    train.set_defaults(func=cmd_train)

    launch = sub.add_parser("launch", help="launch training processes",
                            description="Launch `vincie train` as several processes.")
    lsub = launch.add_subparsers(dest="launch_command", required=True, metavar="{local}")
    local = lsub.add_parser("local", help="torchrun on this machine (gloo on CPU, NCCL on GPUs)",
                            description="Run `vincie train` under torchrun with N processes on this machine, the "
                                        "same entry point as on Kubernetes. The layout comes from the config: "
                                        "parallel.tensor, parallel.pipeline, ...; data parallel takes the rest. "
                                        "SIGTERM to this command reaches every training process: they stop after "
                                        "the step in progress with a checkpoint, and it exits 0.")
    local.add_argument("--nproc", type=int, required=True, metavar="N", help="processes")
    local.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a failure")
    local.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    add_config_arguments(local)
    local.set_defaults(func=cmd_launch_local)

    kube = sub.add_parser("k8s", help="training jobs on Kubernetes (JobSet or PyTorchJob)",
                          description="A training run as a Kubernetes job: k8s.nodes pods of k8s.gpus_per_node "
                                      "torchrun processes (c10d rendezvous), the resolved config in a ConfigMap, "
                                      "S3 credentials from the Secret k8s.s3_secret, run.out_dir on the volume "
                                      "k8s.checkpoint_pvc, restarts that resume from the latest checkpoint. The "
                                      "job is named after run.name. render builds k8s/ with `kubectl kustomize` "
                                      "and prints the run's manifests (a dry run: nothing is sent); submit, status, "
                                      "logs and cancel talk to the cluster of the current kubeconfig context.")
    ksub = kube.add_subparsers(dest="k8s_command", required=True, metavar="{render,submit,status,logs,cancel}")
    render = ksub.add_parser("render", help="print the run's manifests (nothing is sent)",
                             description="Print the job (k8s.kind: jobset or pytorchjob), its headless service and "
                                         "config as YAML.")
    render.add_argument("--monitoring", action="store_true",
                        help="add the PodMonitor, PrometheusRule and Grafana dashboard ConfigMap (once per namespace)")
    render.add_argument("--out", metavar="FILE", help="write to FILE instead of printing")
    submit = ksub.add_parser("submit", help="create the job in the cluster",
                             description="Create the rendered ConfigMap, Service and job in k8s.namespace.")
    kstatus = ksub.add_parser("status", help="the job's state and its pods",
                              description="The job's newest condition, its restarts and its pods' phases.")
    klogs = ksub.add_parser("logs", help="a trainer pod's log", description="The log of node 0's pod (or --pod).")
    klogs.add_argument("--pod", help="pod name (default: the first of the run's pods, node 0)")
    klogs.add_argument("--tail", type=int, help="only the last N lines")
    kcancel = ksub.add_parser("cancel", help="delete the job, its pods, service and config",
                              description="Delete the job (its pods go with it), its service and its ConfigMap. The "
                                          "checkpoints on the volume stay: submitting the run again resumes it.")
    for parser_ in (render, submit, kstatus, klogs, kcancel):
        add_config_arguments(parser_)
        parser_.set_defaults(func=cmd_k8s)

    from vincie.ops.ablate import ABLATIONS

    ablate = sub.add_parser(
        "ablate", help="the paper's ablations on the synthetic world",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the arms of one of the paper's ablations on the synthetic world (several seeds each), "
                    "evaluate them on the same held-out test sessions with the strict judge, and print and plot "
                    "success per turn with intervals, and whether the paper's ordering reproduces "
                    "(docs/ablations.md).\n\nFinished arms are kept under --out: rerunning the command resumes "
                    "(an interrupted training from its checkpoint), so results build up over several runs. Each "
                    "arm's whole training config is written to OUT/NAME/configs/ first, the file that trains the "
                    "same arm on a GPU cluster (vincie k8s submit --config FILE).\n\nablations:\n"
                    + "\n".join(f"  {name:13s} {a.question}" for name, a in ABLATIONS.items()))
    ablate.add_argument("name", choices=sorted(ABLATIONS), metavar="NAME", help=", ".join(ABLATIONS))
    ablate.add_argument("--out", metavar="DIR", help="where data, runs and results are kept (default runs/ablate)")
    ablate.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    ablate.add_argument("--steps", type=int, help="training steps per arm (default: the config's train.steps; the "
                                                   "compute ablation's arms set their own)")
    ablate.add_argument("--sessions", type=int, default=8192,
                        help="distinct training sessions of the arms that do not set their own (default 8192)")
    ablate.add_argument("--nproc", type=int, default=2, help="training processes per arm (default 2)")
    ablate.add_argument("--parallel", type=int, default=1,
                        help="runs trained and evaluated side by side (default 1; on a GPU several small runs share "
                             "the card, each with --nproc processes)")
    ablate.add_argument("--test-sessions", type=int, default=64, help="held-out test sessions (default 64)")
    ablate.add_argument("--turns", type=int, default=5, help="turns per test session (default 5)")
    add_config_arguments(ablate, default="tiny")
    ablate.set_defaults(func=cmd_ablate)
    report = sub.add_parser("report", help="a PNG report of a run's metrics",
                            description="Plot a run's metrics.jsonl (loss per task, step time, throughput, "
                                        "utilisation, gradient norm, learning rate, data wait and skips) into one "
                                        "PNG, written atomically.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (holds metrics.jsonl)")
    report.add_argument("--out", metavar="PNG", help="output path (default: RUN_DIR/report.png)")
    report.set_defaults(func=cmd_report)
    bench.register(sub)
    register_plan(sub)
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
