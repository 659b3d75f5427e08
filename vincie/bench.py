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


BENCH_INSTRUCTIONS = ["move the red circle to the left", "make the blue square bigger", "remove the green triangle",
                      "turn the circle yellow", "add a small cross at the top"]


def random_editor(cfg, seed: int):
    """An Editor with the config's model and random weights (N(0, 0.02), off adaLN-Zero so that outputs are not
    trivially zero): timing does not depend on the weights, and the two ways' outputs can be compared."""
    import torch

    from vincie.inference import Editor, default_device
    from vincie.model import MMDiT
    from vincie.text_encoder import build_text_encoder
    from vincie.vae import build_vae

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


def bench_inference(args: argparse.Namespace) -> int:
    import statistics

    import numpy as np
    import torch
    from tqdm import tqdm

    from vincie.inference import Editor

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
    for _ in tqdm(range(args.repeats), desc="sessions (cache, recompute)", unit="pair", disable=args.json):
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


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="performance benchmarks",
                                  description="Performance benchmarks; record results in docs/BENCHMARKS.md.")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="{synth,inference}")
    p = sub.add_parser("synth", help="synthetic session generation speed",
                       description="Sessions/s of the synthetic world: rendering alone in one process, and end "
                                   "to end (render, encode, shard, index) with 1 and --workers processes.")
    p.add_argument("--sessions", type=int, default=512)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config_arguments(p)
    p.set_defaults(func=bench_synth)

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
