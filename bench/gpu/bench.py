"""GPU benchmark of the MM-DiT's building blocks (run by bench/gpu/run.sh; see docs/BENCHMARKS.md).

1. The bf16 matmul rate this GPU reaches (8192^3), measured.
2. One layer of the 3b preset (a shared layer and a dual-stream one), forward + backward on a block-causal
   sequence, flex attention: model TFLOP/s (vincie.model.flops: allowed attention pairs only), MFU as training and
   `vincie plan` state it (vincie.gpus.mfu: over the card's datasheet bf16 dense peak; none on a card vincie.gpus
   does not know, or the CPU) and, named apart, the matmul-peak ratio (over (1)); bf16 weights, and fp32 weights
   under bf16 autocast (as vincie.training.trainer runs); activation memory per token.
3. Block-causal attention, flex (BlockMask) against SDPA with the dense boolean mask, at about 4k and 16k tokens.
4. FP8 GEMM ceiling: torch._scaled_mm (e4m3, per-tensor scales) against bf16 for the layer's GEMM shapes.
5. With Transformer Engine (and megatron-core) importable: the layer under the TE spec, bf16 and FP8.
6. The layer with activation recomputation (train.recompute=full) against without; and six sessions of 1/16 to
   1/2 of 16k tokens, one per row padded to the longest, against packed into rows of 16k (data.pack).

`--dry-run`: the same code on the CPU with a tiny shape (no meaningful numbers; flex attention forward only, as
PyTorch has no flex backward on the CPU). Details go to OUT/gpu_bench.json, the short table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import replace

import torch
from torch.utils.checkpoint import checkpoint

from vincie.config import ModelConfig, load_config
from vincie.gpus import Card, detect, mfu
from vincie.model.attention import MaskSpec, attend, prepare_mask
from vincie.model.batch import pack_rows
from vincie.model.flops import attention_flops_per_pair, batch_workload, layer_flops_per_token, layout_workload
from vincie.model.mmdit import Linears, MMDiTLayer, Streams, rope_angles
from vincie.model.sequence import BlockType, build_blocks, layout, pack
from vincie.ops.plan import ACT_BYTES_PER_H


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup`."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def session_layout(cfg, tokens: int, grid: tuple[int, int], text: int):
    """The longest block-causal session (with masks) of at most `tokens` tokens."""
    turns = 1
    while layout(build_blocks(turns + 1, True, cfg.sequence, None), [text] * (turns + 1), grid).num_tokens <= tokens:
        turns += 1
    return layout(build_blocks(turns, True, cfg.sequence, None), [text] * turns, grid)


def layer_inputs(m: ModelConfig, rows: list, device, dtype):
    """What a layer sees for rows padded to the longest (token t of row b at flat index t * B + b, as collate lays
    them out): h, shared modulation, text flags, RoPE, the streams, the mask spec."""
    spec = MaskSpec.from_layouts(rows)
    B, T = spec.token_block.shape
    H = m.hidden_size
    is_text = torch.zeros(T, B, dtype=torch.bool)
    positions = torch.zeros(T, B, 3, dtype=torch.int64)
    for b, row in enumerate(rows):
        is_text[:row.num_tokens, b] = torch.tensor([row.blocks[i].type == BlockType.TEXT
                                                    for i in row.token_block.tolist()])
        positions[:row.num_tokens, b] = row.positions
    is_text, flat = is_text.to(device), is_text.reshape(-1).to(device)
    h = torch.randn(T, B, H, device=device, dtype=dtype)
    shared = 0.1 * torch.randn(T, B, 6 * H, device=device, dtype=dtype)
    angles = rope_angles(positions.to(device), H // m.num_heads, m.rope_theta)[:, :, None, :]
    streams = Streams(torch.nonzero(flat)[:, 0], torch.nonzero(~flat)[:, 0], T * B)
    return h, shared, is_text, (angles.cos().to(dtype), angles.sin().to(dtype)), streams, spec.to(device)


def bench_matmul(device, n: int, repeats: int) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n ** 3 / timed(lambda: a @ b, device, 3, repeats) / 1e12


def utilisation(tflops: float, card: Card | None, matmul_tflops: float) -> dict:
    """A layer's model TFLOP/s as MFU (vincie.gpus.mfu over `card`'s datasheet bf16 dense peak, the precision the
    layers run in here, as training states a bf16 run's; None without a card) and as the matmul-peak ratio (over
    the bf16 matmul rate measured on this GPU)."""
    return {"mfu": mfu(tflops * 1e12, card, "bf16") if card else None, "matmul_peak_ratio": tflops / matmul_tflops}


def figures(r: dict) -> str:
    """A layer's two utilisation figures, each under its name."""
    mfu_text = "n/a" if r["mfu"] is None else f"{r['mfu']:.0%}"
    return f"MFU {mfu_text}, matmul-peak ratio {r['matmul_peak_ratio']:.2f}"


def bench_layer(m: ModelConfig, rows: list, device, dual: bool, mode: str, backend: str, backward: bool,
                repeats: int, linears: Linears | None = None, context=None, recompute: bool = False) -> dict:
    """mode: bf16 (bf16 weights) or autocast (fp32 weights, bf16 autocast). `rows`: the layouts of the batch's
    rows (padded to the longest). `recompute`: the layer under a non-reentrant checkpoint, as train.recompute=full
    runs it."""
    layer = MMDiTLayer(m, linears or Linears(), dual=dual).to(device)
    weights = torch.bfloat16 if mode == "bf16" else torch.float32
    layer = layer.to(weights)
    h, shared, is_text, rope, streams, spec = layer_inputs(m, rows, device, weights)
    h.requires_grad_(backward)
    mask = prepare_mask(spec, backend)
    work = batch_workload(rows)

    def run(x):
        return layer(x, shared, is_text, rope, mask, backend, streams)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "autocast"), \
                (context() if context else contextlib.nullcontext()):
            out = checkpoint(run, h, use_reentrant=False, preserve_rng_state=False) if recompute else run(h)
        if backward:
            out.float().square().mean().backward()
        return out

    seconds = timed(step, device, 2, repeats)
    flops = (3 if backward else 1) * (work.tokens * layer_flops_per_token(m)
                                     + work.attention_pairs * attention_flops_per_pair(m))
    result = {"seconds": seconds, "tflops": flops / seconds / 1e12, "tokens": work.tokens,
              "padding_share": 1 - work.tokens / spec.token_block.numel()}
    if device.type == "cuda":  # saved activations: memory held after the forward, per token and hidden unit
        layer.zero_grad(set_to_none=True)
        h.grad = None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "autocast"):
            out = run(h)
        torch.cuda.synchronize()
        result["activation_bytes_per_token_h"] = (torch.cuda.memory_allocated() - before) / work.tokens / m.hidden_size
        del out
    return result


def bench_attention(m: ModelConfig, row, device, backend: str, backward: bool, repeats: int) -> dict:
    T, heads, D = row.num_tokens, m.num_heads, m.hidden_size // m.num_heads
    q, k, v = (torch.randn(1, heads, T, D, device=device, dtype=torch.bfloat16, requires_grad=backward)
               for _ in range(3))
    mask = prepare_mask(MaskSpec.from_layouts([row]).to(device), backend)

    def step():
        out = attend(q, k, v, mask, backend)
        if backward:
            out.sum().backward()

    seconds = timed(step, device, 2, repeats)
    return {"seconds": seconds, "tokens": T, "allowed": layout_workload(row).attention_pairs / T ** 2}


def bench_scaled_mm(tokens: int, n_in: int, n_out: int, device, repeats: int) -> dict:
    """[tokens, n_in] x [n_in, n_out] in bf16 and in FP8 e4m3 (per-tensor scales, bf16 output)."""
    a = torch.randn(tokens, n_in, device=device, dtype=torch.bfloat16)
    w = torch.randn(n_out, n_in, device=device, dtype=torch.bfloat16)
    flops = 2 * tokens * n_in * n_out
    bf16 = timed(lambda: a @ w.t(), device, 3, repeats)
    a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)
    try:
        fp8 = timed(lambda: torch._scaled_mm(a8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                    device, 3, repeats)
    except (RuntimeError, NotImplementedError) as exc:  # no FP8 GEMM on this device (the CPU, pre-Hopper GPUs)
        return {"bf16_tflops": flops / bf16 / 1e12, "fp8_error": str(exc).splitlines()[0][:200]}
    return {"bf16_tflops": flops / bf16 / 1e12, "fp8_tflops": flops / fp8 / 1e12, "speedup": bf16 / fp8}


def bench_te(m: ModelConfig, row, device, repeats: int) -> dict:
    """The layer under the TE spec, bf16 and FP8 (tensorwise); skipped where TE or megatron-core is missing."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core import parallel_state

        from vincie.model.megatron_layers import MegatronLinears
    except ImportError as exc:
        return {"skipped": f"not importable: {exc}"}
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
        parallel_state.initialize_model_parallel()
    out = {}
    for fp8 in ("off", "e4m3"):
        te_cfg = replace(m, spec="te", fp8=fp8, fp8_recipe="tensorwise")
        linears = MegatronLinears(te_cfg)
        out[f"fp8_{fp8}"] = bench_layer(te_cfg, [row], device, False, "bf16", "flex", True, repeats, linears,
                                        lambda: linears.layer_context(0))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, the same code path")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for gpu_bench.json "
                                                                            "(default: $OUT)")
    args = parser.parse_args(argv)
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        print("bench/gpu: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    cfg = load_config("3b")
    m = cfg.model
    text, grid, repeats = 32, (16, 16), 10  # 256 px with the 8x VAE and patch 2: 256 tokens per image
    sizes = (4096, 16384)
    if dry:
        m = replace(m, hidden_size=64, num_heads=2, text_dim=64)
        text, grid, repeats, sizes = 4, (4, 4), 1, (128, 1024)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    card = None if dry else detect(torch.cuda.get_device_name())
    results: dict = {"device": torch.cuda.get_device_name() if not dry else "cpu (dry run)",
                     "card": card.name if card else None,
                     "card_bf16_dense_tflops": card.dense_tflops["bf16"] if card else None,
                     "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "model": {"hidden": m.hidden_size, "heads": m.num_heads, "layers": m.num_layers}}
    matmul = bench_matmul(device, 256 if dry else 8192, repeats)
    results["matmul_bf16_tflops"] = matmul
    print(f"bf16 matmul: {matmul:.0f} TFLOP/s", flush=True)

    rows = {n: session_layout(cfg, n, grid, text) for n in sizes}
    layer_row = rows[sizes[0]]
    backend = "sdpa" if dry else "flex"  # no flex backward on the CPU
    results["layer"] = {}
    for name, dual, mode in (("shared_bf16", False, "bf16"), ("dual_bf16", True, "bf16"),
                             ("shared_autocast", False, "autocast")):
        r = bench_layer(m, [layer_row], device, dual, mode, backend, True, repeats)
        r |= utilisation(r["tflops"], card, matmul)
        results["layer"][name] = r
        print(f"layer {name}: {r['tflops']:.0f} TFLOP/s, {figures(r)}", flush=True)
    recomputed = bench_layer(m, [layer_row], device, False, "autocast", backend, True, repeats, recompute=True)
    results["layer"]["shared_recompute"] = recomputed | utilisation(recomputed["tflops"], card, matmul)
    print(f"layer shared_autocast with recomputation: x{recomputed['seconds'] / r['seconds']:.2f} time", flush=True)

    # data.pack: sessions of 1-6 turns one per row (padded to the longest) against packed into rows of sizes[1]
    sessions = [session_layout(cfg, n, grid, text) for n in (sizes[1] // 2, sizes[1] // 4, sizes[1] // 8,
                                                              sizes[1] // 3, sizes[1] // 6, sizes[1] // 16)]
    packed = [pack([sessions[i] for i in row])
              for row in pack_rows([s.num_tokens for s in sessions], sizes[1])]
    one_per_row = bench_layer(m, sessions, device, False, "autocast", backend, True, repeats)
    packed_rows = bench_layer(m, packed, device, False, "autocast", backend, True, repeats)
    results["packing"] = {"one_per_row": one_per_row, "packed": packed_rows,
                          "time_ratio": packed_rows["seconds"] / one_per_row["seconds"]}
    print(f"packing {len(sessions)} sessions into {len(packed)} rows: x{results['packing']['time_ratio']:.2f} time",
          flush=True)

    results["attention"] = {}
    for n, row in rows.items():
        flex = bench_attention(m, row, device, "flex", not dry, repeats)
        dense = bench_attention(m, row, device, "sdpa", not dry, repeats)
        results["attention"][str(n)] = {"flex_s": flex["seconds"], "sdpa_s": dense["seconds"],
                                        "ratio": flex["seconds"] / dense["seconds"], "tokens": flex["tokens"],
                                        "allowed": flex["allowed"], "backward": not dry}
        print(f"attention {flex['tokens']} tokens: flex/sdpa {flex['seconds'] / dense['seconds']:.2f}", flush=True)

    from vincie.config import fp8_gemm_shapes
    results["fp8_gemm"] = {name: bench_scaled_mm(layer_row.num_tokens // 16 * 16, n_in, n_out, device, repeats)
                           for name, (n_in, n_out) in fp8_gemm_shapes(m, 1).items()}
    results["te"] = bench_te(m, layer_row, device, repeats) if not dry else {"skipped": "dry run"}

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_bench.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)

    lines = [f"{results['device']}, torch {results['torch']}, {results['date']}; details: {path}",
             f"{'what':<44} {'value':>12}",
             f"{'bf16 matmul, measured (TFLOP/s)':<44} {matmul:>12.0f}",
             f"{'bf16 dense peak, datasheet (TFLOP/s)':<44} "
             + (f"{card.dense_tflops['bf16']:>12g}  ({card.name})" if card else f"{'n/a':>12}  (no known card)")]
    for name, r in results["layer"].items():
        lines.append(f"{'3b layer ' + name + ' fwd+bwd TFLOP/s':<44} {r['tflops']:>12.0f}  {figures(r)}")
    if "activation_bytes_per_token_h" in results["layer"]["shared_autocast"]:
        lines.append(f"{'activations B/token/hidden (plan: ' + str(ACT_BYTES_PER_H) + ')':<44} "
                     f"{results['layer']['shared_autocast']['activation_bytes_per_token_h']:>12.0f}")
    lines.append(f"{'layer time with recomputation / without':<44} "
                 f"{recomputed['seconds'] / results['layer']['shared_autocast']['seconds']:>12.2f}")
    p = results["packing"]
    lines.append(f"{'packed / one-per-row layer time (padding)':<44} {p['time_ratio']:>5.2f} "
                 f"({p['packed']['padding_share']:.0%} vs {p['one_per_row']['padding_share']:.0%})")
    for r in results["attention"].values():
        what = f"attention {r['tokens']} tokens, flex/sdpa time"
        lines.append(f"{what:<44} {r['ratio']:>12.2f}")
    for name, r in results["fp8_gemm"].items():
        value = f"{r['speedup']:.2f}x" if "speedup" in r else "n/a"
        lines.append(f"{'fp8/bf16 GEMM speed ' + name:<44} {value:>12}")
    te = results["te"]
    lines.append(f"{'TE layer FP8 vs bf16':<44} " + (f"{te['fp8_off']['seconds'] / te['fp8_e4m3']['seconds']:>11.2f}x"
                                                    if "fp8_off" in te else f"{'skipped':>12}"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
