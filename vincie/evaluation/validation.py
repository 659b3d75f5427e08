"""Validation during training (train.eval_every): what the training loop runs every so many steps on held-out
sessions (data.val_url, a validation split apart from data.eval_url's test split), on every rank of any layout.

- **Loss per task and turn** at fixed timesteps (train.eval_timesteps), with the noise and the context dropout of
  each (session, timestep) drawn from generators seeded by (run.seed, session, timestep) alone: the same inputs at
  every validation, so curves compare across steps and across runs. Sessions are split over data-parallel ranks;
  the forward runs through the trainer's own layout (megatron-core's forward-only schedule under TP/PP) and one
  all-reduce sums the tables.
- **Success per turn**: rank 0 edits the first train.eval_success_sessions sessions turn by turn with the EMA
  weights (what `vincie export` writes), in a plain copy of the model, and the strict synthetic judge
  (vincie.evaluation.synth_judge) scores each turn; the success at turn k is the share of sessions whose turns
  1..k all succeeded. A sample grid (truth and edits, framed by the judge's verdict) goes to
  OUT/validation/step-N.png.

Nothing here draws from the training's random streams (they are seeded by step and sample), so a run's losses
are the same with and without validation (tests/test_validation.py).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.distributed as dist

from vincie import storage
from vincie.data.loader import load_sessions
from vincie.errors import VincieError
from vincie.evaluation.evaluate import edit_synth, grid_png, held_out_sessions
from vincie.evaluation.synth_judge import cumulative_success, judge_session
from vincie.inference.editor import Editor
from vincie.model.sequence import TASKS
from vincie.sessions.loaded import truncate
from vincie.training.loss import task_turn_sums
from vincie.training.trainer import Trainer

STREAM = 0x7A11D  # the validation's seed stream, apart from the training's (seed, step, sample)


class Validator:
    def __init__(self, trainer: Trainer):
        cfg = trainer.cfg
        self.trainer, self.cfg = trainer, cfg
        self.turns = cfg.data.max_turns
        sessions = load_sessions(cfg, cfg.data.val_url, max_turns=self.turns, count=cfg.train.eval_sessions)
        self.sessions = [truncate(s, self.turns) for s in sessions]
        # the judge replays the synthetic world's sessions at their own resolution, all cut to one turn count;
        # rank 0 edits them
        count = cfg.train.eval_success_sessions if trainer.info.is_main else 0
        self.judged_turns = min([s.turns for s in self.sessions[:count]], default=0)
        try:
            self.judged = held_out_sessions(cfg.data.val_url, self.judged_turns, count, cfg.storage) if count else []
        except VincieError as exc:
            raise VincieError(f"train.eval_success_sessions: {exc}; validation sessions the synthetic judge cannot "
                              "score need train.eval_success_sessions=0 (losses only)") from None
        self.grid_dir = os.path.join(cfg.run.out_dir, "validation")

    def samples(self) -> list:
        """This data-parallel rank's share of the (session, timestep) samples, with their fixed draws."""
        t = self.trainer
        out = []
        for i, session in enumerate(self.sessions):
            if i % t.info.dp_size != t.info.dp_rank:
                continue
            for j, timestep in enumerate(self.cfg.train.eval_timesteps):
                sequence = np.random.SeedSequence([self.cfg.run.seed, STREAM, i, j])
                generator = torch.Generator().manual_seed(int(sequence.generate_state(1, dtype=np.uint64)[0] >> 1))
                out.append(t.encoder.training_sample(session, np.random.default_rng(sequence), generator, timestep))
        return out

    def losses(self) -> dict[str, dict[str, float]]:
        """{task: {turn: mean error}} over the held-out sessions (turn "0": release mode's first image)."""
        d = self.cfg.diffusion
        table, reporter = self.trainer.forward_only(
            self.trainer.micro_batches(self.samples()),
            lambda output, batch: task_turn_sums(output, batch, d.prediction, d.loss_space, self.turns))
        info = self.trainer.info
        values = torch.zeros(len(TASKS), self.turns + 1, 2, dtype=torch.float64, device=info.device)
        if table is not None and reporter:
            values += table
        if dist.is_initialized():
            dist.all_reduce(values)
        values = values.cpu()
        return {task: {str(turn): float(values[k, turn, 0] / values[k, turn, 1])
                       for turn in range(self.turns + 1) if values[k, turn, 1] > 0}
                for k, task in enumerate(TASKS) if values[k, :, 1].sum() > 0}

    def editor(self) -> Editor:
        """A plain fp32 copy of the model with the EMA weights (LoRA adapters folded in), for editing."""
        from vincie.inference.export import build_model
        from vincie.training import lora

        t = self.trainer
        weights = {name: tensor.detach().clone() for name, tensor in t.ema.shadow[0].items()}
        if self.cfg.train.lora.rank:
            weights = lora.merge(weights, self.cfg.train.lora)
        model, text_encoder = build_model(self.cfg, weights, t.info.device, "the EMA weights")
        frozen = not getattr(t.text_encoder, "trainable", False)
        return Editor(self.cfg, model, t.vae, t.text_encoder if frozen else text_encoder, t.info.device)

    def success(self, step: int) -> list[float]:
        """Success per turn of the judged sessions (rank 0), and their sample grid."""
        sessions = self.judged
        outputs = edit_synth(self.editor(), sessions, given=False, steps=self.cfg.train.eval_sample_steps or None,
                             cfg_scale=None, seed=self.cfg.run.seed, batch=len(sessions), chain_masks=False,
                             progress=False)
        verdicts = [judge_session(s, out) for s, out in zip(sessions, outputs)]
        os.makedirs(self.grid_dir, exist_ok=True)
        self.grid = grid_png([s.images for s in sessions], outputs, [[v.success for v in s] for s in verdicts],
                             [s.instructions for s in sessions])
        storage.write_bytes_atomic(os.path.join(self.grid_dir, f"step-{step:07d}.png"), self.grid)
        return cumulative_success(verdicts, self.judged_turns)

    def run(self, step: int) -> dict:
        """Every rank calls it; -> the metrics.jsonl record (rank 0's has the success and the grid)."""
        start = time.perf_counter()
        self.grid = None
        record = {"step": step, "val_loss": self.losses()}
        info = self.trainer.info
        if info.is_main and self.judged:
            record["val_success"] = self.success(step)
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait while rank 0 edits
        record["val_s"] = time.perf_counter() - start
        return record
