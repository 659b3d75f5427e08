"""`vincie eval`: multi-turn editing benchmarks. `--bench synth` (below): held-out synthetic sessions, scored by the
strict judge of vincie/evaluation/synth_judge.py, which checks every object of the world's true next state, the
background and the edited region (its module docstring gives the checks and the reasons for their thresholds).
The edits come from a model or from a directory of saved images (`read_predictions`), so any editor is scored by
the same judge. `--bench mse-bench|magicbrush` (`evaluate_benchmark`, at the end): local copies of the public
benchmarks (vincie.evaluation.eval_sets), with L1 / CLIP-I / DINO / CLIP-T (vincie.evaluation.similarity) and a
VLM judge applying MSE-Bench's rule (vincie.evaluation.judge).
"""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from vincie import storage
from vincie.config import StorageConfig
from vincie.errors import VincieError
from vincie.evaluation.synth_judge import (BACKGROUND_TOLERANCE, INPUT_SHARE_MAX, MAX_OBJECT_TOLERANCE,
                                           MIN_OBJECT_TOLERANCE, MOST_OFF_SHARE_OF_SMALLEST, OBJECT_CONTRAST_SHARE,
                                           OBJECT_MATCH_MIN, TurnVerdict, cumulative_success, judge_session)
from vincie.progress import track
from vincie.sessions.session import Session

PREDICTION_NAME = "turn-{:02d}.png"  # DIR/<session key>/turn-01.png ...: one edited image per turn


def held_out_sessions(data_url: str, turns: int, count: int, cfg: StorageConfig | None = None) -> list[Session]:
    """The first `count` sessions of `data_url` (shard order) with at least `turns` turns and masks, cut to their
    first `turns` turns, at their own resolution."""
    from vincie.sessions.shards import iter_sessions

    chosen = []
    for session in iter_sessions(data_url, cfg):
        if len(chosen) == count:
            break
        if session.turns >= turns and session.has_masks:
            chosen.append(Session(session.key, session.images[:turns + 1], session.instructions[:turns],
                                  session.cur_masks[:turns], session.next_masks[:turns], session.meta))
    if not chosen:
        raise VincieError(f"{data_url}: no sessions with {turns} turns and masks to evaluate "
                          f"(make them with: vincie data synth --split test --min-turns {turns} --turns {turns})")
    return chosen


def prediction_url(directory: str, key: str, turn: int) -> str:
    """turn: 1-based."""
    return storage.join(directory, key, PREDICTION_NAME.format(turn))


def read_predictions(directory: str, sessions: list[Session], cfg: StorageConfig | None = None) \
        -> list[list[np.ndarray]]:
    """Saved edits DIR/<session key>/turn-01.png .. turn-K.png -> per session K x (H, W, 3) uint8, each at the
    session's resolution (any mode PIL reads is converted to RGB)."""
    if not storage.exists(directory, cfg):
        raise VincieError(f"--predictions {directory}: no such directory")
    outputs = []
    for session in sessions:
        edits = []
        for turn in range(1, session.turns + 1):
            url = prediction_url(directory, session.key, turn)
            if not storage.exists(url, cfg):
                raise VincieError(f"{url}: missing (expected {PREDICTION_NAME.format(1)} .. "
                                  f"{PREDICTION_NAME.format(session.turns)} in {directory}/<session key>/ for each of "
                                  f"the {len(sessions)} sessions)")
            try:
                image = Image.open(io.BytesIO(storage.read_bytes(url, cfg)))
                image.load()
            except (OSError, Image.DecompressionBombError) as exc:
                raise VincieError(f"{url}: not a readable image ({exc})") from None
            if image.size != (session.width, session.height):
                raise VincieError(f"{url}: {image.size[0]}x{image.size[1]}, expected {session.width}x"
                                  f"{session.height} (the session's resolution)")
            edits.append(np.asarray(image.convert("RGB")))
        outputs.append(edits)
    return outputs


def save_predictions(directory: str, sessions: list[Session], outputs: list[list[np.ndarray]],
                     cfg: StorageConfig | None = None) -> None:
    """The layout read_predictions reads; each file written atomically."""
    for session, edits in zip(sessions, outputs):
        storage.makedirs(storage.join(directory, session.key), cfg)
        for turn, image in enumerate(edits, start=1):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            storage.write_bytes_atomic(prediction_url(directory, session.key, turn), buffer.getvalue(), cfg)


def kind_of(transition: dict) -> str:
    """A synthetic transition's kind: move, recolour, ..., and "undo move" etc. for the world's undo turns."""
    return ("undo " if transition.get("undo") else "") + transition["kind"]


def success_by_kind(sessions: list[Session], scores: list[list[TurnVerdict]]) -> dict[str, dict]:
    """Per transition kind: how many turns of that kind were edited and the share whose own verdict passed (not
    cumulative), so a report shows which edits a model has learned."""
    table: dict[str, list[bool]] = {}
    for session, score in zip(sessions, scores):
        for transition, turn in zip(session.meta.get("transitions", []), score):
            table.setdefault(kind_of(transition), []).append(turn.success)
    return {kind: {"turns": len(v), "success": float(np.mean(v))} for kind, v in sorted(table.items())}


def kinds_line(table: dict[str, dict]) -> str:
    """A by-kind table (success_by_kind) as one line: "add 0.70 (60), move 0.03 (60), ..."."""
    return ", ".join(f"{kind} {row['success']:.2f} ({row['turns']})" for kind, row in table.items())


def ceiling_without(sessions: list[Session], turns: int) -> dict[str, list[float]]:
    """Per transition kind, for k = 1..turns: the share of sessions with no turn of that kind among turns 1..k, the
    most cumulative success a model that never passes that kind can reach (what one unlearned kind costs)."""
    kinds = [[kind_of(t) for t in s.meta.get("transitions", [])[:turns]] for s in sessions]
    return {kind: [float(np.mean([kind not in session[:k + 1] for session in kinds])) for k in range(turns)]
            for kind in sorted({kind for session in kinds for kind in session})}


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


def at_size(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3), bicubic; the image itself when it already has that size."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


CONTEXTS = ("session", "current")


def edit_synth(editor, chosen: list[Session], given: bool, steps: int | None, cfg_scale: float | None, seed: int,
               batch: int, chain_masks: bool, progress: bool, context: str = "session") -> list[list[np.ndarray]]:
    """Each session edited turn by turn from its source (given: from the true previous image, teacher forcing) at
    the model's resolution; every edit brought back to the session's (H, W, 3). context "session": each turn sees
    the whole session so far (its images and instructions); "current": each turn is a session of its own, the
    current image and the turn's instruction only (the paper's context ablation)."""
    from vincie.inference.editor import restore_size

    if context not in CONTEXTS:
        raise VincieError(f"--context {context}: expected one of {', '.join(CONTEXTS)}")
    size, outputs = editor.resolution, []
    desc = "eval, true context" if given else "eval"

    def edit(sources, instructions, given_images, offset):
        if context == "session":
            return editor.edit(sources, instructions, steps=steps, cfg_scale=cfg_scale, seed=seed + offset,
                               chain_masks=chain_masks, given_images=given_images)
        results, current = [[] for _ in sources], list(sources)
        for k in range(len(instructions[0])):  # one-turn sessions, each from the previous turn's edit (or truth)
            if k and given_images is not None:
                current = [images[k] for images in given_images]
            turn = editor.edit(current, [[texts[k]] for texts in instructions], steps=steps, cfg_scale=cfg_scale,
                               seed=seed + offset + 1000 * k, chain_masks=chain_masks)
            for session, (result,) in zip(results, turn):
                session.append(result)
            current = [r[-1].image for r in results]
        return results

    for start in track(range(0, len(chosen), batch), desc=desc, unit="batch", enabled=progress):
        part = chosen[start:start + batch]
        results = edit([at_size(s.images[0], size) for s in part], [s.instructions for s in part],
                       [[at_size(x, size) for x in s.images] for s in part] if given else None, start)
        outputs += [[np.asarray(restore_size(r.image, (s.width, s.height))) if s.width != size else r.image
                     for r in turns] for s, turns in zip(part, results)]
    return outputs


def wilson_interval(rate: float, n: int, z: float = 1.96) -> list[float]:
    """The 95 % Wilson score interval of a success rate over n sessions (the unit a cumulative success counts):
    [low, high], rounded to 3 places. Unlike rate +- z sqrt(rate (1 - rate) / n) it stays inside [0, 1] and is not
    empty at 0 or 1 (0 of 64 sessions: [0, 0.057])."""
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 3), round(min(1.0, centre + half), 3)]


def verdict_fields(verdict: TurnVerdict) -> dict:
    return {"success": verdict.success, "reason": verdict.reason, "worst_object": round(verdict.worst_object, 4),
            "background_mismatch": round(verdict.background_mismatch, 4),
            "input_share": round(verdict.input_share, 4)}


def evaluate_synth(editor, data_url: str, out_dir: str, sessions: int = 32, turns: int = 5, steps: int | None = None,
                   cfg_scale: float | None = None, seed: int = 0, batch: int = 16, progress: bool = True,
                   chain_masks: bool = False, given_truth: bool = False, predictions: str = "",
                   save_predictions_to: str = "", storage_cfg: StorageConfig | None = None,
                   context: str = "session") -> dict:
    """Judges the edits of held-out sessions turn by turn against the world's true states (synth_judge). The edits
    come from `editor`, each session edited turn by turn from its source, or, when editor is None, from the saved
    images in the directory `predictions` (read_predictions). save_predictions_to: also write the model's edits in
    that layout. given_truth (model only): also edit each turn from the true previous image (teacher forcing) and
    report that success per turn and per edit kind, which separates what the model can do at a turn from the drift
    of its own earlier edits (with the session as context, it sees the true earlier images)."""
    chosen = held_out_sessions(data_url, turns, sessions, storage_cfg)
    if editor is None:
        outputs = read_predictions(predictions, chosen, storage_cfg)
    else:
        outputs = edit_synth(editor, chosen, False, steps, cfg_scale, seed, batch, chain_masks, progress, context)
        if save_predictions_to:
            save_predictions(save_predictions_to, chosen, outputs, storage_cfg)
    model_verdicts = [judge_session(s, out) for s, out in zip(chosen, outputs)]
    truth_verdicts = [judge_session(s, s.images[1:]) for s in chosen]
    copy_verdicts = [judge_session(s, [s.images[0]] * turns) for s in chosen]
    report = {
        "bench": "synth",
        "data": data_url,
        "predictions": predictions if editor is None else None,  # where the edits came from; None: the model
        "chain_masks": chain_masks,
        "context": context,
        "sessions": len(chosen),
        "turns": turns,
        "judge": {"object_contrast_share": OBJECT_CONTRAST_SHARE, "min_object_tolerance": MIN_OBJECT_TOLERANCE,
                  "max_object_tolerance": MAX_OBJECT_TOLERANCE, "object_match_min": OBJECT_MATCH_MIN,
                  "background_tolerance": BACKGROUND_TOLERANCE,
                  "most_off_share_of_smallest": MOST_OFF_SHARE_OF_SMALLEST, "input_share_max": INPUT_SHARE_MAX},
        "success": {"model": cumulative_success(model_verdicts, turns),
                    "ground_truth": cumulative_success(truth_verdicts, turns),
                    "copy_input": cumulative_success(copy_verdicts, turns)},
        "interval": "95 % Wilson score interval over sessions",
        "by_kind": {"model": success_by_kind(chosen, model_verdicts),
                    "copy_input": success_by_kind(chosen, copy_verdicts)},
        "ceiling_without": ceiling_without(chosen, turns),
        "session_results": [{"id": s.key, "instructions": s.instructions,
                             "turns": [verdict_fields(v) for v in verdicts]}
                            for s, verdicts in zip(chosen, model_verdicts)],
    }
    report["success_interval"] = {name: [wilson_interval(rate, len(chosen)) for rate in rates]
                                  for name, rates in report["success"].items()}
    if editor is not None:
        report["denoising"] = denoising_probe(editor, [Session(s.key, [at_size(x, editor.resolution)
                                                                       for x in s.images[:2]], s.instructions)
                                                       for s in chosen], seed)
    if given_truth:  # each turn on its own, from the true previous image: not cumulative
        given = [judge_session(s, out) for s, out in
                 zip(chosen, edit_synth(editor, chosen, True, steps, cfg_scale, seed, batch, chain_masks, progress,
                                        context))]
        report["success_given_truth"] = [float(np.mean([s[k].success for s in given])) for k in range(turns)]
        report["by_kind_given_truth"] = success_by_kind(chosen, given)
    os.makedirs(out_dir, exist_ok=True)
    storage.write_bytes_atomic(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1).encode())
    storage.write_bytes_atomic(os.path.join(out_dir, "grid.png"), grid_png(
        [s.images for s in chosen[:8]], outputs[:8], [[t.success for t in s] for s in model_verdicts[:8]],
        [s.instructions for s in chosen[:8]]))
    return report


def format_table(report: dict) -> str:
    turns = report["turns"]
    lines = ["turn            " + "".join(f"{k + 1:>7d}" for k in range(turns))]
    for name in ("model", "copy_input", "ground_truth"):
        lines.append(f"{name:16s}" + "".join(f"{v:7.2f}" for v in report["success"][name]))
    if "success_interval" in report:
        lines.append(f"model, {report['interval']} ({report['sessions']}): "
                     + ", ".join(f"turn {k + 1} {lo:.2f}-{hi:.2f}"
                                 for k, (lo, hi) in enumerate(report["success_interval"]["model"])))
    if "success_given_truth" in report:
        lines.append(f"{'given truth':16s}" + "".join(f"{v:7.2f}" for v in report["success_given_truth"])
                     + "   (model, each turn alone from the true previous image)")
        lines.append("given truth, per edit kind (turns): " + kinds_line(report["by_kind_given_truth"]))
    if "denoising" in report:
        probe = report["denoising"]
        lines.append("turn-1 x0 error by noise level t: "
                     + ", ".join(f"t={t} {v:.4f}" for t, v in probe["x0_mse"].items())
                     + f" (copy-input {probe['copy_input']:.4f}, mean {probe['mean']:.4f})")
        lines.append("turn-1 x0 change when the instruction is swapped: "
                     + ", ".join(f"t={t} {v:.1e}" for t, v in probe["text_swap_change"].items())
                     + " (about copy-input when the instruction is followed, near 0 when it is ignored)")
    kinds = report["by_kind"]["model"]
    lines.append("success per edit kind, over all turns (turns): " + kinds_line(kinds))
    if kinds:
        ceiling = report["ceiling_without"]  # the weakest kind; of equally weak ones, the one that costs the most
        weakest = min(kinds, key=lambda kind: (kinds[kind]["success"], ceiling[kind][-1]))
        lines.append(f"with no {weakest} passing (the weakest kind), success per turn is at most: "
                     + " ".join(f"{v:.2f}" for v in ceiling[weakest]))
    failed = [turn["reason"].split(":")[0] for session in report["session_results"] for turn in session["turns"]
              if not turn["success"]]
    if failed:
        lines.append("failed turns by first failed check: "
                     + ", ".join(f"{check} {failed.count(check)}" for check in sorted(set(failed))))
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
