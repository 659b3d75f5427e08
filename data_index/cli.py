"""`vincie data ...`: synthetic data, the session index, contact sheets."""

from __future__ import annotations

import argparse
import json
import os

from vincie.config import add_config_arguments, config_from_args

SYNTH_FLAGS = {  # command-line flag -> config key it overrides
    "resolution": "synth.resolution",
    "turns": "synth.max_turns",
    "min_turns": "synth.min_turns",
    "pairs": "synth.pairs",
    "noise": "synth.noise_std",
    "jitter": "synth.jitter_px",
    "image_format": "synth.image_format",
    "shard_size": "synth.shard_size",
}


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def cmd_synth(args: argparse.Namespace) -> int:
    from data_index.synthetic.synth import SynthJob, run_synth

    flags = [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in SYNTH_FLAGS.items()
             if getattr(args, flag) not in (None, False)]
    cfg = config_from_args(args, extra=flags)
    job = SynthJob(out=args.out, sessions=args.sessions, split=args.split, seed=args.seed, synth=cfg.synth,
                   videos=args.videos or "", video_codecs=args.video_codecs.split(","))
    summary = run_synth(job, cfg.storage, workers=args.workers, overwrite=args.overwrite)
    print(f"synth: {summary['sessions']} sessions in {plural(summary['shards'], 'shard')} at {args.out} "
          f"({summary['made']} made in {summary['seconds']:.1f}s, {summary['sessions_per_s']:.1f} sessions/s; "
          f"{plural(summary['skipped_shards'], 'shard')} already complete)")
    if args.videos:
        print(f"synth: videos and ground truth under {args.videos}")
    return 0


INGEST_FLAGS = {  # command-line flag -> config key it overrides
    "text": "ingest.text",
    "vlm_url": "ingest.vlm.url",
    "vlm_model": "ingest.vlm.model",
    "masks": "ingest.masks",
    "masks_weights": "ingest.masks_weights_dir",
    "max_side": "ingest.max_side",
    "max_turns": "ingest.max_turns",
    "shard_size": "ingest.shard_size",
    "source": "ingest.source",
}


def cmd_ingest(args: argparse.Namespace) -> int:
    from data_index.ingest.pipeline import MANIFEST_FILE, run_ingest

    flags = [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in INGEST_FLAGS.items()
             if getattr(args, flag) is not None]
    cfg = config_from_args(args, extra=flags)
    summary = run_ingest(args.videos, args.out, cfg, workers=args.workers, overwrite=args.overwrite)
    outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(summary["outcomes"].items())) or "none"
    print(f"ingest: {summary['processed']} of {plural(summary['videos'], 'video')} processed "
          f"({summary['skipped']} already done) in {summary['seconds']:.1f}s: {summary['sessions_made']} sessions, "
          f"{summary['turns_made']} turns ({summary['videos_per_s']:.2f} videos/s, "
          f"{summary['sessions_per_s']:.2f} sessions/s); outcomes: {outcomes}")
    print(f"ingest: {summary['sessions']} sessions indexed at {args.out}; per-video outcomes in "
          f"{os.path.join(args.out, MANIFEST_FILE) if '://' not in args.out else args.out + '/' + MANIFEST_FILE}")
    return 1 if summary["outcomes"].get("failed") else 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from vincie.sessions.index import build_index, index_url

    cfg = config_from_args(args)
    table = build_index(args.url, cfg.storage)
    print(f"index build: {table.num_rows} sessions -> {index_url(args.url)}")
    return 0


def cmd_index_verify(args: argparse.Namespace) -> int:
    from vincie.sessions.index import verify

    cfg = config_from_args(args)
    sessions, problems = verify(args.url, cfg.storage, decode=not args.quick)
    for line in problems:
        print(f"verify: {line}")
    if problems:
        print(f"verify: {len(problems)} problem(s) in {args.url} ({sessions} sessions in the index)")
        return 1
    print(f"verify: OK: {sessions} sessions, index and shards agree"
          + ("" if args.quick else ", every image and mask decodes"))
    return 0


def cmd_index_stats(args: argparse.Namespace) -> int:
    from vincie.sessions.index import plot_stats, read_index, summarize

    cfg = config_from_args(args)
    table = read_index(args.url, cfg.storage)
    summary = summarize(table)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{summary['sessions']} sessions in {summary['shards']} shards, {summary['turns_total']} turns, "
              f"{summary['images_total']} images, {summary['with_masks']} with masks")
        for name in ("turns_histogram", "split", "source", "resolution"):
            print(f"  {name.replace('_', ' ')}: " + ", ".join(f"{k}: {v}" for k, v in summary[name].items()))
        print(f"  instruction words (mean): {summary['instruction_words_mean']:.2f}")
        if summary["mask_area_mean"] is not None:
            print(f"  mask area (mean share of image): {summary['mask_area_mean']:.3f}")
        print("  text annotator: " + ", ".join(f"{k}: {v}" for k, v in summary["text_annotator"].items()))
        for source, s in summary["per_source"].items():
            area = "n/a" if s["mask_area_mean"] is None else f"{s['mask_area_mean']:.3f}"
            quality = "n/a" if s["quality_mean"] is None else f"{s['quality_mean']:.2f}"
            print(f"  source {source}: {s['sessions']} sessions, {s['turns_total']} turns "
                  f"({s['turns_mean']:.2f} per session), {s['instruction_words_mean']:.2f} words per instruction, "
                  f"mask area {area}, quality {quality}")
    plot = args.plot or (os.path.join(args.url, "stats.png") if "://" not in args.url else None)
    if plot and table.num_rows:
        plot_stats(table, plot, cfg.storage)
        print(f"stats: histograms -> {plot}")
    return 0


def cmd_index_split(args: argparse.Namespace) -> int:
    from vincie.sessions.index import assign_splits, read_index, summarize, write_index

    cfg = config_from_args(args)
    table = assign_splits(read_index(args.url, cfg.storage), args.val, args.test)
    write_index(args.url, table, cfg.storage)
    print("split: " + ", ".join(f"{k}: {v}" for k, v in summarize(table)["split"].items()))
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from data_index.precompute import precompute

    cfg = config_from_args(args)
    counts = precompute(args.url, args.out, cfg)
    print(f"precompute: {counts['sessions']} sessions -> {args.out} ({counts['without_features']} without features; "
          f"{plural(counts['kept_shards'], 'shard')} already complete)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from data_index.show import write_contact_sheet

    cfg = config_from_args(args)
    count = write_contact_sheet(args.url, args.out, args.sessions, cfg.storage, cell=args.cell)
    print(f"show: {count} sessions -> {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="make, index and inspect session shards",
                                 description="Make, index and inspect session shards (local paths or s3:// URLs).")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="{synth,ingest,index,precompute,show}")

    p = sub.add_parser("synth", help="generate synthetic video-world sessions into shards",
                       description="Generate sessions of the synthetic video world (exact instructions and "
                                   "region masks) into WebDataset shards at --out, then index them. Deterministic "
                                   "for a seed; rerunning the same command resumes an interrupted run.")
    p.add_argument("--out", required=True, metavar="URL", help="output directory: a local path or s3://bucket/prefix")
    p.add_argument("--sessions", required=True, type=int, metavar="N", help="number of sessions")
    p.add_argument("--resolution", type=int, metavar="R", help="frame size in pixels (default 64)")
    p.add_argument("--turns", type=int, metavar="K", help="most turns per session (default 6)")
    p.add_argument("--min-turns", type=int, metavar="K", help="fewest turns per session (default 2)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed (default 0)")
    p.add_argument("--split", default="train", choices=["train", "val", "test"],
                   help="split; each split draws from its own seed stream (default train)")
    p.add_argument("--pairs", action="store_true", help="one-turn sessions (the paper's pair-data ablation)")
    p.add_argument("--noise", type=float, metavar="STD", help="sensor noise, std in 0..255 units (default 0)")
    p.add_argument("--jitter", type=int, metavar="PX", help="camera jitter, pixels (default 0)")
    p.add_argument("--image-format", choices=["jpg", "png"], help="image encoding (default jpg)")
    p.add_argument("--shard-size", type=int, metavar="N", help="sessions per shard (default 256)")
    p.add_argument("--videos", metavar="URL", help="also write each scene as video files with ground truth here")
    p.add_argument("--video-codecs", default="vp9,h264", metavar="LIST",
                   help="video codecs, comma-separated from vp9 (webm), mjpeg (avi), h264 (mp4); default vp9,h264")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run with other settings at --out")
    add_config_arguments(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("ingest", help="turn real videos into session shards (scene cuts, sampling, annotators)",
                       description="Turn every video under --videos (local dir or s3://, recursively, by file "
                                   "suffix: ingest.extensions) into sessions: PyAV decoding, PySceneDetect scene "
                                   "cuts, hybrid frame sampling (equal intervals plus a fixed count per scene), "
                                   "filters (borders, dark, near-duplicate, short scenes), transition text and "
                                   "region masks from pluggable annotators. Writes shards, index.parquet and "
                                   "manifest.jsonl (one line per video: sessions made or why none) to --out. "
                                   "Rerunning resumes: videos already done are skipped. Exit status 1 when a "
                                   "video failed for a reason a rerun may fix (the VLM endpoint, storage).")
    p.add_argument("--videos", required=True, metavar="URL", help="input videos: a local dir or s3://bucket/prefix")
    p.add_argument("--out", required=True, metavar="URL", help="output dataset root: a local path or s3://...")
    p.add_argument("--text", choices=["offline", "vlm"],
                   help="transition text: offline (templated from the frame difference, no model; default) or vlm")
    p.add_argument("--vlm-url", metavar="URL", help="OpenAI-compatible endpoint (…/v1) for --text vlm; the API key "
                                                    "comes from $OPENAI_API_KEY (ingest.vlm.api_key_env)")
    p.add_argument("--vlm-model", metavar="NAME", help="model name for --text vlm")
    p.add_argument("--masks", metavar="KIND", help="region masks: offline (frame difference; default), grounded "
                                                   "(GroundingDINO + SAM2, needs --masks-weights) or "
                                                   "module.path:ClassName")
    p.add_argument("--masks-weights", metavar="DIR", help="local weights directory for --masks grounded")
    p.add_argument("--max-side", type=int, metavar="PX", help="session frames' longer side (default 512)")
    p.add_argument("--max-turns", type=int, metavar="K", help="most turns per session (default 6)")
    p.add_argument("--shard-size", type=int, metavar="N", help="sessions per shard (default 64)")
    p.add_argument("--source", metavar="NAME", help="the index's source name for these sessions (default video)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run with other settings at --out")
    add_config_arguments(p)
    p.set_defaults(func=cmd_ingest)

    index = sub.add_parser("index", help="build, verify, split and summarise the session index",
                           description="The session index: URL/index.parquet, one row per session.")
    isub = index.add_subparsers(dest="index_command", required=True, metavar="{build,stats,verify,split}")
    for name, func, text in (("build", cmd_index_build, "scan the shards under URL and write URL/index.parquet"),
                             ("stats", cmd_index_stats, "print counts and write histograms (PNG)"),
                             ("verify", cmd_index_verify, "check index and shards agree; name every disagreement"),
                             ("split", cmd_index_split, "assign train/val/test by scene, deterministically")):
        q = isub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        q.add_argument("url", metavar="URL", help="dataset root: a local path or s3://bucket/prefix")
        if name == "verify":
            q.add_argument("--quick", action="store_true", help="check structure only, do not decode images")
        if name == "stats":
            q.add_argument("--plot", metavar="PNG", help="histogram file (default URL/stats.png for local data)")
            q.add_argument("--json", action="store_true", help="print the summary as JSON")
        if name == "split":
            q.add_argument("--val", type=float, default=0.05, help="share of scenes for val (default 0.05)")
            q.add_argument("--test", type=float, default=0.05, help="share of scenes for test (default 0.05)")
        add_config_arguments(q)
        q.set_defaults(func=func)

    p = sub.add_parser("precompute", help="copy a dataset with VAE latents (and frozen text features) added",
                       description="Copy the shards of URL to --out with each session's VAE latents at its bucket "
                                   "and, for a frozen text encoder (text_encoder.kind hf), its text features, as "
                                   "the config (--config) would compute them; training on the copy skips decoding "
                                   "and encoding. Resumable; the index is built last.")
    p.add_argument("url", metavar="URL", help="dataset root: a local path or s3://bucket/prefix")
    p.add_argument("--out", required=True, metavar="URL", help="output dataset root")
    add_config_arguments(p)
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("show", help="draw sessions as a contact sheet PNG",
                       description="Draw the first sessions of a dataset as a PNG: one row per session, "
                                   "instructions under the images, masks as outlines (white: cur, red: next).")
    p.add_argument("url", metavar="URL", help="dataset root or one shard")
    p.add_argument("--out", required=True, metavar="PNG")
    p.add_argument("--sessions", type=int, default=6, help="how many sessions (default 6)")
    p.add_argument("--cell", type=int, default=128, help="pixels per image (default 128)")
    add_config_arguments(p)
    p.set_defaults(func=cmd_show)
