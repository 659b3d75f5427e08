"""`vincie eval`: multi-turn editing benchmarks. `--bench synth` (below): held-out synthetic sessions, scored by an
exact judge. `--bench mse-bench|magicbrush` (`evaluate_benchmark`, at the end): local copies of the public
benchmarks (vincie.evaluation.eval_sets), with L1 / CLIP-I / DINO / CLIP-T (vincie.evaluation.similarity) and a
VLM judge applying MSE-Bench's rule (vincie.evaluation.judge).

The synth judge mirrors MSE-Bench's two criteria with ground truth in place of a GPT judge. For turn k it compares
the edited image with the true image I_{k+1} pixel by pixel (a pixel *matches* when its mean absolute error over
RGB is at most 24 of 255):
- instruction followed: >= 80 % of the pixels inside the true changed region (cur | next masks) match;
- consistency: >= 95 % of the pixels outside it match.
A turn succeeds when both hold; success is cumulative (a session stops counting at its first failed turn).

Why these thresholds (fixed before any model was scored): 24/255 tolerates compression-level error and a
slightly off shading, and is far below the difference between an object and the background or between two object
colours (> 60), so a wrong colour or a missing object never matches. Copying the input passes consistency but fails the region
test, because a moved or resized object changes most of its region (a move of resolution/8 leaves at most about
half of the old and new footprint overlapping, a resize changes at least half). 80 % leaves room for a soft
edge; 95 % outside allows a few stray pixels, not a visibly changed second object (a small object covers about
3 % of the frame). Every report also scores the ground truth (must be 1.0) and "return the input unchanged"
(must be near 0) with the same judge.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from vincie import storage
from vincie.errors import VincieError
from vincie.model.batch import tensor_to_image
from vincie.progress import track
from vincie.sessions.loaded import LoadedSession
from vincie.sessions.session import Session

PIXEL_TOLERANCE = 24.0
FOLLOW_MIN = 0.80
CONSISTENCY_MIN = 0.95


@dataclass
class TurnScore:
    followed: float  # share of matching pixels inside the changed region
    consistent: float  # share of matching pixels outside it

    @property
    def success(self) -> bool:
        return self.followed >= FOLLOW_MIN and self.consistent >= CONSISTENCY_MIN


def judge_turn(edited: np.ndarray, truth: np.ndarray, region: np.ndarray) -> TurnScore:
    """edited, truth (H, W, 3) uint8; region (H, W) bool: the true changed region."""
    match = np.abs(edited.astype(np.float32) - truth.astype(np.float32)).mean(axis=-1) <= PIXEL_TOLERANCE
    inside = float(match[region].mean()) if region.any() else 1.0
    outside = float(match[~region].mean()) if (~region).any() else 1.0
    return TurnScore(inside, outside)


def to_session(s: LoadedSession) -> Session:
    """Decoded pixels back to uint8 images (exact where no resize happened) and numpy masks, for the judge."""
    masks = lambda m: [x.numpy() for x in m] if s.has_masks else None  # noqa: E731
    return Session(key=s.key, images=[tensor_to_image(x) for x in s.images], instructions=s.instructions,
                   cur_masks=masks(s.cur_masks), next_masks=masks(s.next_masks), meta=s.meta)


def judge_session(session: Session, outputs: list[np.ndarray]) -> list[TurnScore]:
    return [judge_turn(out, session.images[k + 1], session.cur_masks[k] | session.next_masks[k])
            for k, out in enumerate(outputs)]


def cumulative_success(scores: list[list[TurnScore]], turns: int) -> list[float]:
    """Share of sessions whose turns 1..k all succeeded, for k = 1..turns."""
    rates = []
    for k in range(turns):
        rates.append(float(np.mean([all(s.success for s in session[:k + 1]) for session in scores])))
    return rates


def success_by_kind(sessions: list[Session], scores: list[list[TurnScore]]) -> dict[str, dict]:
    """Per transition kind (move, recolour, ...): how many turns of that kind were edited and the share that
    succeeded on their own (not cumulative), so a report shows which edits a model has learned."""
    table: dict[str, list[bool]] = {}
    for session, score in zip(sessions, scores):
        for transition, turn in zip(session.meta.get("transitions", []), score):
            table.setdefault(transition["kind"], []).append(turn.success)
    return {kind: {"turns": len(v), "success": float(np.mean(v))} for kind, v in sorted(table.items())}


PROBE_TIMES = (0.9, 0.5, 0.2, 0.05)


@torch.no_grad()
def denoising_probe(editor, sessions: list[Session], seed: int = 0) -> dict:
    """How well the model predicts the clean turn-1 image from [I0, T0, noisy I1] at fixed noise levels: mean
    squared error of its x0 estimate (latent units) at each t in PROBE_TIMES, beside two baselines computed
    without the model: the source image I0 ("copy_input") and the target's mean value ("mean"). A model that
    uses its context beats copy_input at high t; one that does not stays near or above it.

    "text_swap_change": how much the x0 estimate moves (mean squared change) when T0 is replaced by the next
    session's instruction, same image and noise. A model that follows instructions moves it by about as much as
    an edit changes an image (copy_input); one that ignores them barely moves it."""
    from vincie.model.diffusion import noisy

    def x0_estimate(source: torch.Tensor, instruction: str, x_t: torch.Tensor, t: float) -> torch.Tensor:
        # a fresh generator per call: both instructions see the same noise on the source (release mode noises it)
        return editor.x0_estimate(source, instruction, x_t, t, torch.Generator().manual_seed(seed))

    generator = torch.Generator().manual_seed(seed)
    errors: dict[float, list[float]] = {t: [] for t in PROBE_TIMES}
    text_change: dict[float, list[float]] = {t: [] for t in PROBE_TIMES}
    copy, mean = [], []
    for k, session in enumerate(sessions):
        source, x0 = editor.encode_images(session.images[:2])
        other_instruction = sessions[(k + 1) % len(sessions)].instructions[0]
        copy.append(float(((source - x0) ** 2).mean()))
        mean.append(float(((x0 - x0.mean()) ** 2).mean()))
        for t in PROBE_TIMES:
            x_t = noisy(x0, torch.randn(x0.shape, generator=generator).to(x0.device), t)
            estimate = x0_estimate(source, session.instructions[0], x_t, t)
            errors[t].append(float(((estimate - x0) ** 2).mean()))
            swapped = x0_estimate(source, other_instruction, x_t, t)
            text_change[t].append(float(((estimate - swapped) ** 2).mean()))
    return {"x0_mse": {str(t): float(np.mean(v)) for t, v in errors.items()},
            "text_swap_change": {str(t): float(np.mean(v)) for t, v in text_change.items()},
            "copy_input": float(np.mean(copy)), "mean": float(np.mean(mean))}


FRAME = {True: (40, 200, 60), False: (220, 40, 40), None: (110, 110, 110)}  # success, failure, not judged


def grid_png(truths: list[list[np.ndarray]], outputs: list[list[np.ndarray]], success: list[list[bool | None]],
             instructions: list[list[str]], cell: int = 96) -> bytes:
    """Per session two rows: the source and the ground truth per turn (truths[i]: the source first, then the true
    images if the benchmark has them), then the model's edits framed green (success), red (failure) or grey (not
    judged), each with its instruction."""
    font = ImageFont.load_default()
    caption = 30
    width = cell * (1 + max(len(out) for out in outputs))
    height = len(outputs) * (2 * cell + caption + 8)
    sheet = Image.new("RGB", (width, height), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for truth, out, ok, texts in zip(truths, outputs, success, instructions):
        for k, picture in enumerate(truth):
            sheet.paste(Image.fromarray(picture).resize((cell, cell), Image.NEAREST), (k * cell, y))
        for k, picture in enumerate(out, start=1):
            sheet.paste(Image.fromarray(picture).resize((cell, cell), Image.NEAREST), (k * cell, y + cell))
            draw.rectangle([k * cell, y + cell, (k + 1) * cell - 1, y + 2 * cell - 1], outline=FRAME[ok[k - 1]],
                           width=2)
            text = texts[k - 1]
            draw.text((k * cell + 2, y + 2 * cell + 1), text[:cell // 6] + "\n" + text[cell // 6:cell // 3],
                      fill=(220, 220, 220), font=font)
        draw.text((2, y + cell + 2), "model", fill=(255, 255, 255), font=font)
        draw.text((2, y + 2), "source" if len(truth) == 1 else "truth", fill=(255, 255, 255), font=font)
        y += 2 * cell + caption + 8
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def evaluate_synth(editor, data_url: str, out_dir: str, sessions: int = 32, turns: int = 5, steps: int | None = None,
                   cfg_scale: float | None = None, seed: int = 0, batch: int = 16, progress: bool = True,
                   chain_masks: bool = False, given_truth: bool = False) -> dict:
    """Edits held-out sessions turn by turn from their sources and judges every turn against the ground truth.
    given_truth: also edit each turn from the true previous image (teacher forcing) and report that per-turn
    success, which separates what the model can do at a turn from the drift of its own earlier edits."""
    from vincie.data.loader import load_sessions

    chosen = [to_session(s) for s in load_sessions(editor.cfg, data_url, max_turns=turns)
              if s.turns == turns and s.has_masks][:sessions]
    if not chosen:
        raise VincieError(f"{data_url}: no sessions with {turns} turns and masks to evaluate "
                          f"(make them with: vincie data synth --split test --min-turns {turns} --turns {turns})")

    def edit_all(given: bool, desc: str) -> list[list[np.ndarray]]:
        outputs = []
        for start in track(range(0, len(chosen), batch), desc=desc, unit="batch", enabled=progress):
            part = chosen[start:start + batch]
            results = editor.edit([s.images[0] for s in part], [s.instructions for s in part], steps=steps,
                                  cfg_scale=cfg_scale, seed=seed + start, chain_masks=chain_masks,
                                  given_images=[s.images for s in part] if given else None)
            outputs += [[r.image for r in session] for session in results]
        return outputs

    outputs = edit_all(False, "eval")
    model_scores = [judge_session(s, out) for s, out in zip(chosen, outputs)]
    truth_scores = [judge_session(s, s.images[1:]) for s in chosen]
    copy_scores = [judge_session(s, [s.images[0]] * turns) for s in chosen]
    report = {
        "bench": "synth",
        "data": data_url,
        "sessions": len(chosen),
        "turns": turns,
        "chain_masks": chain_masks,
        "judge": {"pixel_tolerance": PIXEL_TOLERANCE, "follow_min": FOLLOW_MIN, "consistency_min": CONSISTENCY_MIN},
        "success": {"model": cumulative_success(model_scores, turns),
                    "ground_truth": cumulative_success(truth_scores, turns),
                    "copy_input": cumulative_success(copy_scores, turns)},
        "per_turn_mean": {"followed": [float(np.mean([s[k].followed for s in model_scores])) for k in range(turns)],
                          "consistent": [float(np.mean([s[k].consistent for s in model_scores]))
                                         for k in range(turns)]},
        "by_kind": {"model": success_by_kind(chosen, model_scores), "copy_input": success_by_kind(chosen, copy_scores)},
        "denoising": denoising_probe(editor, chosen, seed),
    }
    if given_truth:  # each turn on its own, from the true previous image: not cumulative
        given = [judge_session(s, out) for s, out in zip(chosen, edit_all(True, "eval, true context"))]
        report["success_given_truth"] = [float(np.mean([s[k].success for s in given])) for k in range(turns)]
    os.makedirs(out_dir, exist_ok=True)
    storage.write_bytes_atomic(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1).encode())
    storage.write_bytes_atomic(os.path.join(out_dir, "grid.png"), grid_png(
        [s.images for s in chosen[:8]], outputs[:8], [[t.success for t in s] for s in model_scores[:8]],
        [s.instructions for s in chosen[:8]]))
    return report


def format_table(report: dict) -> str:
    turns = report["turns"]
    lines = ["turn            " + "".join(f"{k + 1:>7d}" for k in range(turns))]
    for name in ("model", "copy_input", "ground_truth"):
        lines.append(f"{name:16s}" + "".join(f"{v:7.2f}" for v in report["success"][name]))
    if "success_given_truth" in report:
        lines.append(f"{'given truth':16s}" + "".join(f"{v:7.2f}" for v in report["success_given_truth"])
                     + "   (model, each turn alone from the true previous image)")
    probe = report["denoising"]
    lines.append("turn-1 x0 error by noise level t: " + ", ".join(f"t={t} {v:.4f}" for t, v in probe["x0_mse"].items())
                 + f" (copy-input {probe['copy_input']:.4f}, mean {probe['mean']:.4f})")
    lines.append("turn-1 x0 change when the instruction is swapped: "
                 + ", ".join(f"t={t} {v:.1e}" for t, v in probe["text_swap_change"].items())
                 + " (about copy-input when the instruction is followed, near 0 when it is ignored)")
    kinds = report["by_kind"]["model"]
    lines.append("success per edit kind, over all turns (turns): "
                 + ", ".join(f"{kind} {v['success']:.2f} ({v['turns']})" for kind, v in kinds.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Public benchmarks: MSE-Bench and MagicBrush (vincie.evaluation.eval_sets), with vincie.evaluation.similarity's
# metrics and vincie.evaluation.judge's VLM judge


def edit_sessions(editor, sessions: list, steps: int | None, cfg_scale: float | None, seed: int, batch: int,
                  progress: bool, chain_masks: bool = False) -> list[list[np.ndarray]]:
    """Each session edited turn by turn from its source (resized to the model's square size); every edit
    restored to the source's size. Sessions with the same number of turns share a batch."""
    from vincie.inference.editor import restore_size

    size = editor.resolution
    edits: dict[str, list[np.ndarray]] = {}
    groups = [[s for s in sessions if s.turns == n] for n in sorted({s.turns for s in sessions})]
    chunks = [group[k:k + batch] for group in groups for k in range(0, len(group), batch)]
    for index, chunk in enumerate(track(chunks, desc="edit", unit="batch", enabled=progress)):
        sources = [np.asarray(Image.fromarray(s.source).resize((size, size), Image.BICUBIC)) for s in chunk]
        results = editor.edit(sources, [s.instructions for s in chunk], steps=steps, cfg_scale=cfg_scale,
                              seed=seed + index, chain_masks=chain_masks)
        for session, turns in zip(chunk, results):
            height, width = session.source.shape[:2]
            edits[session.id] = [np.asarray(restore_size(r.image, (width, height))) for r in turns]
    return [edits[s.id] for s in sessions]


def mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def evaluate_benchmark(editor, bench: str, data: str, out_dir: str, sessions: int | None = None,
                       steps: int | None = None, cfg_scale: float | None = None, seed: int = 0, clip_model: str = "",
                       dino_model: str = "", judge=None, batch: int = 8, progress: bool = True,
                       chain_masks: bool = False) -> dict:
    """`bench`: mse-bench or magicbrush, read from the local directory `data`. Metrics per turn: L1 (when the
    benchmark has ground truth), CLIP-I / DINO / CLIP-T (when model directories are given), and the judge's
    cumulative success (a vincie.evaluation.judge.VLMJudge, optional)."""
    from vincie.evaluation.eval_sets import LOADERS
    from vincie.evaluation.judge import cumulative_success
    from vincie.evaluation.similarity import Clip, Dino, turn_metrics

    clip = Clip(clip_model) if clip_model else None  # model directories fail before any editing
    dino = Dino(dino_model) if dino_model else None
    chosen = LOADERS[bench](data)[:sessions]
    edits = edit_sessions(editor, chosen, steps, cfg_scale, seed, batch, progress, chain_masks)
    metrics = [[turn_metrics(edit, s.targets[k] if s.targets else None,
                             s.captions[k] if s.captions else s.instructions[k], clip, dino)
                for k, edit in enumerate(session_edits)] for s, session_edits in zip(chosen, edits)]
    judged = [judge.judge_session(s.source, s.instructions, e)
              for s, e in track(list(zip(chosen, edits)), desc="judge", unit="session", enabled=progress)] \
        if judge else None
    turns = max(s.turns for s in chosen)
    per_turn = []
    for k in range(turns):
        present = [i for i, s in enumerate(chosen) if s.turns > k]
        row = {"turn": k + 1, "sessions": len(present)}
        for name in ("l1", "clip_i", "dino", "clip_t"):
            values = [metrics[i][k][name] for i in present if name in metrics[i][k]]
            if values:
                row[name] = mean_or_none(values)
        if judged is not None:
            scored = [judged[i][k] for i in present if judged[i][k] is not None]
            row["success"] = cumulative_success(judged, turns)[k]
            row["judged"] = len(scored)
            row["prompt_following"] = mean_or_none([j.prompt_following for j in scored])
            row["consistency"] = mean_or_none([j.consistency for j in scored])
        per_turn.append(row)
    report = {
        "bench": bench, "data": data, "sessions": len(chosen), "turns": turns, "per_turn": per_turn,
        "models": {"clip": clip_model or None, "dino": dino_model or None,
                   "judge": {"url": judge.chat.url, "model": judge.chat.model} if judge else None},
        "session_results": [
            {"id": s.id, "instructions": s.instructions, "metrics": m,
             "judge": [vars(j) | {"success": j.success} if j else None for j in judged[i]] if judged else None}
            for i, (s, m) in enumerate(zip(chosen, metrics))],
    }
    os.makedirs(out_dir, exist_ok=True)
    storage.write_bytes_atomic(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1).encode())
    storage.write_bytes_atomic(os.path.join(out_dir, "grid.png"), grid_png(
        [[s.source] + (s.targets or []) for s in chosen[:8]], edits[:8],
        [[j.success if j else None for j in judged[i]] if judged else [None] * chosen[i].turns for i in range(
            min(8, len(chosen)))], [s.instructions for s in chosen[:8]]))
    return report


def format_benchmark_table(report: dict) -> str:
    rows = report["per_turn"]
    names = [n for n in ("sessions", "success", "prompt_following", "consistency", "l1", "clip_i", "dino", "clip_t")
             if any(n in r for r in rows)]
    lines = ["turn            " + "".join(f"{r['turn']:>9d}" for r in rows)]
    for name in names:
        cells = [r.get(name) for r in rows]
        lines.append(f"{name:16s}" + "".join("        -" if v is None else f"{v:9d}" if isinstance(v, int)
                                             else f"{v:9.3f}" for v in cells))
    return "\n".join(lines)
