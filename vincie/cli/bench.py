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

from vincie.config import add_config_arguments, config_from_args
from vincie.errors import VincieError
from vincie.progress import track


def bench_synth(args: argparse.Namespace) -> int:
    from data_index.synthetic.synth import SynthJob, run_synth
    from data_index.synthetic.world import generate_session

    cfg = config_from_args(args, extra=[f"synth.resolution={args.resolution}"])
    results = {"resolution": args.resolution, "sessions": args.sessions, "cpus": os.cpu_count(),
               "machine": platform.processor() or platform.machine()}
    start = time.perf_counter()
    for i in range(args.sessions):
        generate_session(cfg.synth, "train", 0, i)
    results["render_sessions_per_s_1proc"] = args.sessions / (time.perf_counter() - start)
    runs = [(workers, False) for workers in sorted({1, args.workers})]
    runs += [(args.workers, True)] if args.videos else []
    for workers, videos in runs:
        with tempfile.TemporaryDirectory() as tmp:
            job = SynthJob(out=os.path.join(tmp, "data"), sessions=args.sessions, split="train", seed=0,
                           synth=cfg.synth, videos=os.path.join(tmp, "videos") if videos else "")
            start = time.perf_counter()
            run_synth(job, cfg.storage, workers=workers, progress=False)
            name = "end_to_end_with_videos" if videos else "end_to_end"
            results[f"{name}_sessions_per_s_{workers}proc"] = args.sessions / (time.perf_counter() - start)
    print_results(results, args.json)
    return 0


def ground_truth_agreement(videos: str, out: str, storage_cfg) -> dict:
    """Ingested synthetic videos against the ground truth beside them: share of videos whose one session has one
    image per state in order, and the offline masks' mean IoU with the true masks per transition kind."""
    import glob

    import numpy as np

    from vincie.sessions.shards import iter_sessions

    by_video = {}
    for session in iter_sessions(out, storage_cfg):
        by_video.setdefault(session.meta["video"], []).append(session)
    aligned, total, ious = 0, 0, {}
    for path in sorted(glob.glob(os.path.join(videos, "*.gt.json"))):
        with open(path) as f:
            truth = json.load(f)
        masks = np.load(os.path.join(videos, truth["masks"]))
        for name in truth["videos"].values():
            total += 1
            found = by_video.get(name, [])
            states = [f // truth["hold_frames"] for f in found[0].meta["frame_indices"]] if len(found) == 1 else []
            if states != list(range(len(truth["state_start_frames"]))):
                continue
            aligned += 1
            for k, transition in enumerate(truth["transitions"]):
                for pred, true in ((found[0].cur_masks[k], masks["cur"][k]), (found[0].next_masks[k], masks["next"][k])):
                    true = true.astype(bool)
                    ious.setdefault(transition["kind"], []).append(float((pred & true).sum() / max(1, (pred | true).sum())))
    result = {"aligned_videos": f"{aligned}/{total}"}
    result.update({f"mask_iou_{kind}": float(np.mean(v)) for kind, v in sorted(ious.items())})
    result.update({f"mask_pairs_{kind}": len(v) for kind, v in sorted(ious.items())})
    return result


def bench_ingest(args: argparse.Namespace) -> int:
    from data_index.ingest.pipeline import run_ingest
    from data_index.synthetic.synth import SynthJob, run_synth

    cfg = config_from_args(args, extra=[f"synth.resolution={args.resolution}", f"synth.jitter_px={args.jitter}",
                                        "synth.min_turns=2", f"synth.max_turns={args.turns}",
                                        f"ingest.interval_s={args.interval}"])
    results = {"sessions": args.sessions, "resolution": args.resolution, "jitter_px": args.jitter,
               "codecs": args.codecs, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
               "load_average_1min_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        videos = os.path.join(tmp, "videos")
        job = SynthJob(out=os.path.join(tmp, "synth"), sessions=args.sessions, split="test", seed=1, synth=cfg.synth,
                       videos=videos, video_codecs=args.codecs.split(","))
        run_synth(job, cfg.storage, workers=args.workers, progress=False)
        for workers in sorted({1, args.workers}):
            out = os.path.join(tmp, f"out{workers}")
            summary = run_ingest(videos, out, cfg, workers=workers, progress=False)
            results[f"videos_per_s_{workers}proc"] = summary["videos_per_s"]
            results[f"sessions_per_s_{workers}proc"] = summary["sessions_per_s"]
            results[f"worker_cpu_s_per_video_{workers}proc"] = summary["cpu_seconds"] / max(1, summary["processed"])
        results["videos"] = summary["videos"]
        results["sessions_made"] = summary["sessions_made"]
        results.update(ground_truth_agreement(videos, out, cfg.storage))
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
    from vincie.data.loader import SessionReader, Skipped
    from vincie.data.order import RowRef
    from vincie.sessions.index import read_index

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
    from vincie.training.parallel import init_distributed
    from vincie.training.trainer import Trainer

    trainer = Trainer(cfg, init_distributed())
    logs = [trainer.train_step() for _ in track(range(steps), desc="tiny training", unit="step")]
    trainer.loader.close()
    measured = logs[warmup:]
    step_s = sum(log["step_s"] for log in measured)
    return {"tiny_step_s": step_s / len(measured),
            "tiny_data_wait_share": sum(log["data_s"] for log in measured) / step_s}


def bench_loader(args: argparse.Namespace) -> int:
    from data_index.synthetic.synth import SynthJob, run_synth
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
        for source, root, decoder, _ in track(runs, desc="decode", unit="pass"):
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


BENCH_INSTRUCTIONS = ["move the red circle to the left", "make the blue square bigger", "remove the green triangle",
                      "turn the circle yellow", "add a small cross at the top"]


def random_editor(cfg, seed: int):
    """An Editor with the config's model and random weights (N(0, 0.02), off adaLN-Zero so that outputs are not
    trivially zero): timing does not depend on the weights, and the two ways' outputs can be compared."""
    import torch

    from vincie.inference.editor import Editor, default_device
    from vincie.model.mmdit import MMDiT
    from vincie.model.text_encoder import build_text_encoder
    from vincie.model.vae import build_vae

    device = default_device()
    torch.manual_seed(seed)
    with torch.device(device):  # made where it runs: no host-side initialisation of a large model
        model, text_encoder = MMDiT(cfg.model), build_text_encoder(cfg.text_encoder, cfg.model.text_dim)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in [*model.parameters(), *text_encoder.parameters()]:
            p.normal_(0.0, 0.02, generator=generator)
    return Editor(cfg, model, build_vae(cfg.vae).to(device), text_encoder, device)


class PeakMemory:
    """Peak memory of a stretch of work above its start: CUDA's max_memory_allocated, or on CPU the process's
    resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs after glibc returns freed memory
    to the system with malloc_trim). `available` is False where neither works (then peaks read None)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.available = self.cuda or os.access("/proc/self/clear_refs", os.W_OK)

    @staticmethod
    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.available:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark to the current resident set
            self.base = self.status("VmRSS")

    def peak(self) -> int | None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self.status("VmHWM") - self.base if self.available else None


def training_samples(cfg, sessions: int, seed: int):
    """-> (the config's EditModel, training samples of `sessions` synthetic sessions drawn at data.resolution), on
    the CPU in one process (vincie.training.parallel.init_distributed first)."""
    import dataclasses

    import numpy as np
    import torch

    from data_index.synthetic.world import generate_session
    from vincie.model.batch import SessionEncoder
    from vincie.model.components import build_components
    from vincie.sessions.loaded import from_session

    cpu = torch.device("cpu")
    torch.manual_seed(seed)
    model, vae, text_encoder = build_components(cfg, cpu)
    encoder = SessionEncoder(cfg, vae, text_encoder, cpu)
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    synth = dataclasses.replace(cfg.synth, resolution=cfg.data.resolution)
    samples = [encoder.training_sample(from_session(generate_session(synth, "train", 0, i).session), rng, generator)
               for i in range(sessions)]
    return model, samples


def held_per_token_and_unit(cfg, sessions: int = 2) -> float:
    """Bytes a training forward leaves allocated (what the backward keeps, and the output), per token of the
    padded batch and hidden unit, from the profiler's allocation events on the CPU; bf16 autocast when
    train.precision is bf16."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vincie.model.batch import collate

    model, samples = training_samples(cfg, sessions, seed=0)
    batch = collate(samples, torch.device("cpu"), cfg.model.text_dim)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # read when the profiler first starts: no start/stop lines
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            out = model(batch.inputs)  # kept: it holds the graph, and the graph what the backward needs
    assert out.requires_grad
    held = sum(event.self_cpu_memory_usage for event in prof.events())
    return held / batch.inputs.mask.token_block.numel() / cfg.model.hidden_size


def activation_memory(cfg) -> dict:
    """The activation terms of `vincie plan` measured on the config's model (its layer counts replaced): bytes
    per token and hidden unit per shared and per dual-stream layer, per layer with train.recompute=full, and per
    stage (what does not grow with the layers), from forwards of 2 and 4 layers."""
    import dataclasses

    from vincie.config import validate

    def held(layers: int, dual: int, recompute: str) -> float:
        variant = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=layers,
                                                                     dual_stream_layers=dual),
                                      train=dataclasses.replace(cfg.train, recompute=recompute))
        validate(variant)
        return held_per_token_and_unit(variant)

    plain = {(n, d): held(n, d, "none") for n, d in ((2, 1), (4, 1), (4, 4))}
    shared = (plain[4, 1] - plain[2, 1]) / 2
    recompute = {n: held(n, 1, "full") for n in (2, 4)}
    per_layer_recompute = (recompute[4] - recompute[2]) / 2
    return {"per_layer_shared": shared, "per_layer_dual": (plain[4, 4] - plain[4, 1]) / 3 + shared,
            "per_layer_recompute": per_layer_recompute, "per_stage": plain[2, 1] - 2 * shared,
            "per_stage_recompute": recompute[2] - 2 * per_layer_recompute}


def bench_inference(args: argparse.Namespace) -> int:
    import statistics

    import numpy as np
    import torch

    from vincie.inference.editor import Editor

    editor = Editor.load(args.model) if args.model else random_editor(config_from_args(args), args.seed)
    cfg = editor.cfg
    steps = args.steps or cfg.diffusion.sample_steps
    cfg_scale = cfg.diffusion.cfg_scale if args.cfg is None else args.cfg
    if not editor.use_cache:
        from vincie.errors import VincieError

        raise VincieError("this model uses full attention (sequence.mode: full): it has no KV cache to compare")
    rng = np.random.default_rng(args.seed)
    images = [rng.integers(0, 256, (editor.resolution, editor.resolution, 3), dtype=np.uint8)
              for _ in range(args.sessions)]
    instructions = [[BENCH_INSTRUCTIONS[(i + k) % 5] for k in range(args.turns)] for i in range(args.sessions)]
    memory = PeakMemory(editor.device)
    times: dict[str, list[float]] = {"cache": [], "recompute": []}
    peaks: dict[str, list[int]] = {"cache": [], "recompute": []}
    outputs = {}
    for mode in times:  # warm-up: first calls allocate and pick kernels
        editor.use_cache = mode == "cache"
        editor.edit(images, [x[:1] for x in instructions], steps=1, cfg_scale=cfg_scale, seed=args.seed)
    for _ in track(range(args.repeats), desc="sessions (cache, recompute)", unit="pair", enabled=not args.json):
        for mode in times:  # alternating, so that load from other processes hits both alike
            editor.use_cache = mode == "cache"
            memory.start()
            start = time.perf_counter()
            outputs[mode] = editor.edit(images, instructions, steps=steps, cfg_scale=cfg_scale, seed=args.seed,
                                        chain_masks=args.chain_masks)
            if editor.device.type == "cuda":
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - start)
            peaks[mode].append(memory.peak())
    median = {mode: statistics.median(t) for mode, t in times.items()}
    g = editor.grid
    results = {
        "model": args.model or f"{args.config} (random weights)", "resolution": editor.resolution,
        "tokens_per_image": g[0] * g[1], "sessions": args.sessions, "turns": args.turns, "steps": steps,
        "cfg_scale": cfg_scale, "chain_masks": args.chain_masks, "repeats": args.repeats,
        "device": str(editor.device), "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cache_s": times["cache"], "recompute_s": times["recompute"],
        "median_cache_s": median["cache"], "median_recompute_s": median["recompute"],
        "speedup": median["recompute"] / median["cache"],
        "peak_memory_mib": {mode: (max(p) / 2 ** 20 if None not in p else None) for mode, p in peaks.items()},
        "max_pixel_difference": max(int(np.abs(a.image.astype(int) - b.image.astype(int)).max())
                                    for sa, sb in zip(outputs["cache"], outputs["recompute"])
                                    for a, b in zip(sa, sb)),
    }
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{args.turns}-turn session x {args.sessions}, {steps} steps, guidance {cfg_scale}, "
          f"{g[0] * g[1]} tokens per image, on {results['device']} ({results['threads']} threads)")
    for mode in times:
        peak = results["peak_memory_mib"][mode]
        print(f"  {mode:10s} median {median[mode]:8.2f} s  (all: {', '.join(f'{t:.2f}' for t in times[mode])})  "
              f"peak memory {'n/a' if peak is None else f'{peak:.1f} MiB'}")
    print(f"  speedup {results['speedup']:.2f}x; largest pixel difference between the two: "
          f"{results['max_pixel_difference']} of 255")
    return 0


def bench_memory(args: argparse.Namespace) -> int:
    from vincie.config import ffn_hidden_size
    from vincie.ops.plan import ACT_BYTES_PER_H, RECOMPUTE_BYTES_PER_H, STAGE_BYTES_PER_H
    from vincie.training.parallel import init_distributed

    h = args.hidden
    if h < 1 or h % args.head_dim:
        raise VincieError(f"--hidden ({h}) must be a positive multiple of --head-dim ({args.head_dim})")
    cfg = config_from_args(args, extra=[f"model.hidden_size={h}", f"model.num_heads={h // args.head_dim}",
                                        f"model.text_dim={h}", "train.precision=bf16"])
    init_distributed()
    measured = activation_memory(cfg)
    plan = {"per_layer_shared": ACT_BYTES_PER_H, "per_layer_dual": ACT_BYTES_PER_H,
            "per_layer_recompute": RECOMPUTE_BYTES_PER_H, "per_stage": STAGE_BYTES_PER_H,
            "per_stage_recompute": STAGE_BYTES_PER_H}
    if args.json:
        print(json.dumps({"config": args.config, "hidden": h, "head_dim": args.head_dim,
                          "mlp_width": ffn_hidden_size(cfg.model), "measured": measured, "plan": plan}, indent=1))
        return 0
    print(f"activation memory, bytes per token and hidden unit: {args.config} at hidden {h}, heads of "
          f"{args.head_dim}, MLP width {ffn_hidden_size(cfg.model)}, bf16 autocast, CPU")
    print(f"{'':30} {'measured':>9} {'vincie plan':>12}")
    for key, value in measured.items():
        print(f"{key.replace('_', ' '):30} {value:>9.1f} {plan[key]:>12}")
    return 0


def bench_train(args: argparse.Namespace) -> int:
    """Training steps (forward, backward, AdamW) of the config's model on synthetic sessions, eager against
    torch.compile'd (the MM-DiT's forward, dynamic shapes), in alternating blocks of the same batches."""
    import statistics

    import torch

    from vincie.model.batch import collate
    from vincie.training.loss import flow_loss_sums
    from vincie.training.parallel import init_distributed

    cfg = config_from_args(args)
    init_distributed()
    batch = cfg.train.batch_size
    model, samples = training_samples(cfg, args.batches * batch, args.seed)
    batches = [collate(samples[k:k + batch], torch.device("cpu"), cfg.model.text_dim)
               for k in range(0, len(samples), batch)]
    for b in batches:  # made once, used every pass: the text features leave the encoder's graph (its table's
        b.inputs.text_tokens = b.inputs.text_tokens.detach()  # gradient is not part of the step measured)
    tokens = sum(int(b.inputs.mask.token_block.numel()) for b in batches)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    d = cfg.diffusion
    eager = model.dit.forward
    forwards = {"eager": eager, "compiled": torch.compile(eager, dynamic=True)}

    def run_all() -> float:
        start = time.perf_counter()
        for b in batches:
            loss, _ = flow_loss_sums(model(b.inputs), b, d.loss_weights, d.prediction, d.loss_space)
            (loss / max(1, b.target.shape[0])).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    first = {}
    for mode, forward in forwards.items():  # warm-up: the compiled forward compiles for these shapes here
        model.dit.forward = forward
        first[mode] = run_all()
    seconds = {mode: [] for mode in forwards}
    for repeat in range(args.repeats):
        for mode in (forwards if repeat % 2 == 0 else reversed(list(forwards))):
            model.dit.forward = forwards[mode]
            seconds[mode].append(run_all())
    with torch.no_grad():  # the compiled forward computes what the eager one does
        outputs = {mode: forward(batches[0].inputs) for mode, forward in forwards.items()}
    model.dit.forward = eager
    difference = float((outputs["compiled"] - outputs["eager"]).abs().max() / outputs["eager"].abs().max())
    rate = {mode: tokens / statistics.median(s) for mode, s in seconds.items()}
    result = {"config": args.config, "batches": len(batches), "batch_size": batch, "tokens_per_pass": tokens,
              "threads": torch.get_num_threads(), "tokens_per_s": rate, "speedup": rate["compiled"] / rate["eager"],
              "first_pass_s": first, "seconds": seconds, "relative_output_difference": difference}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"training steps of {args.config}'s model: {len(batches)} batches of {batch} sessions ({tokens} token "
          f"slots per pass), {args.repeats} alternating passes each, {torch.get_num_threads()} threads, CPU")
    for mode in forwards:
        print(f"{mode:9s} {rate[mode]:10.0f} tokens/s (median pass {statistics.median(seconds[mode]):.2f} s; "
              f"first pass {first[mode]:.1f} s)")
    print(f"compiled / eager: {result['speedup']:.2f}x; outputs differ by {difference:.1e} (relative)")
    return 0


def packed_session_rows(cfg, rows: int) -> tuple[list, list[int]]:
    """Rows of data.max_tokens tokens filled as training packs them (vincie.model.batch.pack_rows) with sessions of
    the config's shape: the first bucket at data.resolution, instructions of text_encoder.max_tokens tokens,
    masks, nothing dropped; data.max_turns turns, then one fewer, ... down to 1, again from the top, while the
    total fits in `rows` rows, then the last ones left out until pack_rows fits them in `rows` rows (sessions
    longer than a row are never taken). -> (the packed Layouts, tokens per session)."""
    import itertools

    from vincie.config import bucket_shapes
    from vincie.model.batch import pack_rows
    from vincie.model.sequence import build_blocks, layout, pack

    h, w = bucket_shapes(cfg)[0]
    cell = cfg.vae.factor * cfg.model.patch_size
    capacity, text = cfg.data.max_tokens, cfg.text_encoder.max_tokens
    by_turns = [layout(build_blocks(turns, True, cfg.sequence, None), [text] * turns, (h // cell, w // cell))
                for turns in range(cfg.data.max_turns, 0, -1)]
    fitting = [s for s in by_turns if s.num_tokens <= capacity]
    if not fitting:
        raise VincieError(f"data.max_tokens ({capacity}) is less than one turn of {cfg.data.resolution} px "
                          f"({by_turns[-1].num_tokens} tokens)")
    sessions = []
    for session in itertools.cycle(fitting):
        if sum(s.num_tokens for s in sessions) + session.num_tokens > rows * capacity:
            break
        sessions.append(session)
    while len(grouped := pack_rows([s.num_tokens for s in sessions], capacity)) > rows:
        sessions.pop()  # the total fits, the sessions do not: the last one out
    return [pack([sessions[i] for i in row]) for row in grouped], [s.num_tokens for s in sessions]


def bench_blockmask(args: argparse.Namespace) -> int:
    import statistics

    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    from vincie.model.attention import MaskSpec, allowed, flex_block_mask

    cfg = config_from_args(args)
    rows, lengths = packed_session_rows(cfg, args.rows)
    spec = MaskSpec.from_layouts(rows, num_tokens=cfg.data.max_tokens)
    B, T = spec.batch, spec.num_tokens
    builders = {
        "from_tiles": lambda: flex_block_mask(spec, args.tile),
        "every_pair": lambda: create_block_mask(lambda b, h, q, kv: allowed(spec, b, q, kv), B, None, T, T,
                                                device="cpu", BLOCK_SIZE=args.tile),
    }
    masks = {name: build() for name, build in builders.items()}  # warm-up, and what is compared
    fields = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
              "full_q_num_blocks", "full_q_indices")
    identical = all(torch.equal(getattr(masks["from_tiles"], f), getattr(masks["every_pair"], f)) for f in fields)
    memory = PeakMemory(torch.device("cpu"))
    times: dict[str, list[float]] = {name: [] for name in builders}
    peaks: dict[str, list] = {name: [] for name in builders}
    for _ in track(range(args.repeats), desc="BlockMask (from tiles, every pair)", unit="pair", enabled=not args.json):
        for name, build in builders.items():  # alternating, so that load from other processes hits both alike
            memory.start()
            start = time.perf_counter()
            build()
            times[name].append(time.perf_counter() - start)
            peaks[name].append(memory.peak())
    results = {
        "config": args.config, "rows": B, "tokens_per_row": T, "sessions": len(lengths), "session_tokens": lengths,
        "padding_share": 1 - sum(lengths) / (B * T), "tile": args.tile, "repeats": args.repeats,
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "seconds": times, "median_s": {name: statistics.median(t) for name, t in times.items()},
        "peak_memory_mib": {name: (max(p) / 2 ** 20 if None not in p else None) for name, p in peaks.items()},
        "sparsity_percent": masks["from_tiles"].sparsity(),
        "identical": identical,
    }
    results["speedup"] = results["median_s"]["every_pair"] / results["median_s"]["from_tiles"]
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"flex BlockMask of {B} rows x {T} tokens ({len(lengths)} sessions of {min(lengths)}-{max(lengths)} "
          f"tokens, {results['padding_share']:.1%} padding), tiles of {args.tile}, {results['threads']} threads")
    for name in builders:
        peak = results["peak_memory_mib"][name]
        print(f"  {name:10s} median {results['median_s'][name]:8.3f} s  (all: "
              f"{', '.join(f'{t:.3f}' for t in times[name])})  peak memory "
              f"{'n/a' if peak is None else f'{peak:.1f} MiB'}")
    print(f"  every pair / from tiles {results['speedup']:.1f}x; sparsity {results['sparsity_percent']:.1f}%; "
          f"the same BlockMask: {'yes' if results['identical'] else 'NO'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="performance benchmarks",
                                  description="Performance benchmarks; record results in docs/BENCHMARKS.md.")
    sub = bench.add_subparsers(dest="bench_command", required=True,
                               metavar="{synth,ingest,loader,inference,memory,blockmask}")
    p = sub.add_parser("synth", help="synthetic session generation speed",
                       description="Sessions/s of the synthetic world: rendering alone in one process, and end "
                                   "to end (render, encode, shard, index) with 1 and --workers processes; with "
                                   "--videos also end to end writing every session as video files (VP9 and "
                                   "H.264, with their ground truth) with --workers processes.")
    p.add_argument("--sessions", type=int, default=512)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--videos", action="store_true", help="also time writing video files (`vincie data synth --videos`)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_arguments(p)
    p.set_defaults(func=bench_synth)

    p = sub.add_parser("ingest", help="real-video ingest speed and accuracy on the synthetic world's videos",
                       description="Write --sessions synthetic sessions as video files (--codecs) with their ground "
                                   "truth, ingest them with 1 and --workers processes (offline annotators), and "
                                   "report videos/s and sessions/s of the ingest (synthesis not counted) with the "
                                   "worker CPU seconds per video (what a loaded machine cannot hide), the share "
                                   "of videos whose session has exactly one image per true state, and the offline "
                                   "masks' mean IoU with the true masks per transition kind.")
    p.add_argument("--sessions", type=int, default=24)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--turns", type=int, default=4, help="most turns per synthetic session (default 4)")
    p.add_argument("--jitter", type=int, default=0, help="camera jitter, pixels (default 0)")
    p.add_argument("--codecs", default="h264,vp9")
    p.add_argument("--interval", type=float, default=0.5, help="ingest.interval_s (states last 1 s; default 0.5)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_arguments(p)
    p.set_defaults(func=bench_ingest)

    p = sub.add_parser("loader", help="data loader speed: DALI against PIL, local and S3; data wait in training",
                       description="Sessions/s and images/s (images and masks decoded) of reading sessions (ranged "
                                   "read, parse, decode to the bucket) with DALI and with the PIL reference at the "
                                   "same thread count, from local disk and from an S3 server (moto, started in its "
                                   "own process on 127.0.0.1); best of --repeats interleaved passes. Then the "
                                   "share of step time `tiny` training waits for data (--steps steps, one "
                                   "process, --workers loader processes, 32x32 PNG sessions as in `make demo`).")
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

    p = sub.add_parser("inference", help="multi-turn editing latency and memory: KV cache against recompute",
                       description="Edit the same session (same steps, same seed) with the block-causal KV cache "
                                   "and by recomputing the whole sequence at every step, alternating, --repeats "
                                   "times each after a warm-up; report the median time of each, the speedup, the "
                                   "peak memory above the start of each session (CUDA: max_memory_allocated; "
                                   "CPU: resident-set high-water mark) and the largest pixel difference between "
                                   "the two outputs. The model is --model (an export or a run directory) or, "
                                   "without it, --config's model with random weights.")
    p.add_argument("--model", metavar="DIR", help="exported model or training run directory")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--sessions", type=int, default=1, help="sessions edited side by side")
    p.add_argument("--steps", type=int, help="Euler steps per target (default: diffusion.sample_steps)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: diffusion.cfg_scale)")
    p.add_argument("--chain-masks", action="store_true", help="current mask, next mask, then image, per turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_arguments(p)
    p.set_defaults(func=bench_inference)

    p = sub.add_parser("memory", help="activation memory per token, plain and recomputed, against vincie plan",
                       description="Bytes a training forward under bf16 autocast leaves allocated for the backward, "
                                   "per token and hidden unit, on the CPU (the profiler's allocation events): per "
                                   "shared and per dual-stream layer, per layer with train.recompute=full, and per "
                                   "stage, from forwards of 2 and 4 layers of --config's model at --hidden (heads "
                                   "of --head-dim) on synthetic sessions; beside the constants `vincie plan` uses.")
    p.add_argument("--hidden", type=int, default=384, help="model.hidden_size (default 384)")
    p.add_argument("--head-dim", type=int, default=128, help="head width, the 3b's (default 128)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_arguments(p)
    p.set_defaults(func=bench_memory)

    p = sub.add_parser("train", help="training step speed: eager against torch.compile",
                       description="Training steps (forward, backward, AdamW) of --config's model on --batches "
                                   "batches of train.batch_size synthetic sessions, with the MM-DiT's forward eager "
                                   "and torch.compile'd (dynamic shapes), in alternating passes over the same "
                                   "batches after one warm-up pass each (the compiled one compiles there): tokens/s "
                                   "of each (median pass) and their ratio. One process on the CPU.")
    p.add_argument("--batches", type=int, default=8, help="batches per pass (default 8)")
    p.add_argument("--repeats", type=int, default=4, help="measured passes per mode (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_arguments(p)
    p.set_defaults(func=bench_train)

    p = sub.add_parser("blockmask", help="flex attention's BlockMask: built from tiles against create_block_mask",
                       description="Build flex attention's BlockMask for --rows rows of data.max_tokens tokens "
                                   "packed with block-causal sessions of --config's shape (data.max_turns turns down "
                                   "to 1, with masks) in two ways, alternating, --repeats times after a warm-up: "
                                   "from tiles (vincie.model.attention.flex_block_mask, what training uses) and with "
                                   "flex's create_block_mask, which evaluates the rule at every (query, key) pair. "
                                   "Reports the median time, the peak resident set above the start of each build, "
                                   "the sparsity and whether the two BlockMasks are the same. On the CPU; --config "
                                   "3b gives 2 rows of 16384 tokens at 256 px.")
    p.add_argument("--rows", type=int, default=2, help="rows of data.max_tokens tokens (default 2)")
    p.add_argument("--tile", type=int, default=128, help="BlockMask tile size (default 128, flex's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_arguments(p)
    p.set_defaults(func=bench_blockmask)
