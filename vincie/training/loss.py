"""The training loss: rectified flow's squared velocity error over a batch's target tokens, weighted per task."""

from __future__ import annotations

import functools

import torch

from vincie.model.batch import Batch
from vincie.model.diffusion import X0_MIN_T, output_to_velocity
from vincie.model.sequence import TASKS


def flow_loss_sums(output: torch.Tensor, batch: Batch, weights: dict[str, float],
                   prediction: str, loss_space: str = "velocity") -> tuple[torch.Tensor, torch.Tensor]:
    """Task-weighted sum of the per-token squared velocity error over this batch's target tokens, and per task
    (sum, count) of the unweighted error as a (len(TASKS), 2) float64 tensor. `output` is the model's output for
    every latent token [N_lat, P], read as `prediction` (diffusion.output_to_velocity). The trainer divides by the
    target-token count of the whole global batch, so the loss (and the gradient) does not depend on how the batch
    is split over ranks."""
    err = token_errors(output, batch, prediction, loss_space)
    table = task_weight_table(tuple(weights[t] for t in TASKS), err.device)
    weighted_sum = (table[batch.target_task] * batch.target_weight * err).sum()
    # per task (error sum, token count), left on the device: the step reads every micro-batch's at once
    per_task = torch.zeros(len(TASKS), 2, dtype=torch.float64, device=err.device)
    per_task[:, 0].index_add_(0, batch.target_task, err.detach().double())
    per_task[:, 1].index_add_(0, batch.target_task, torch.ones_like(err, dtype=torch.float64))
    return weighted_sum, per_task


def token_errors(output: torch.Tensor, batch: Batch, prediction: str, loss_space: str) -> torch.Tensor:
    """(N_target,) the unweighted squared error of each target token, in `loss_space`."""
    velocity = output_to_velocity(output[batch.target_index].float(), batch.target_inputs, batch.target_t,
                                  prediction)
    err = ((velocity - batch.target) ** 2).mean(dim=-1)
    if loss_space == "x0":  # x0 - x0_hat = t (v_hat - v)
        err = err * batch.target_t[:, 0].clamp(min=X0_MIN_T) ** 2
    return err


def task_turn_sums(output: torch.Tensor, batch: Batch, prediction: str, loss_space: str,
                   turns: int) -> torch.Tensor:
    """(len(TASKS), turns + 1, 2) float64: per task and edit turn (Batch.target_turn) the error sum and token
    count of this batch's target tokens (validation: vincie.evaluation.validation)."""
    err = token_errors(output, batch, prediction, loss_space).double()
    cell = batch.target_task * (turns + 1) + batch.target_turn.clamp(max=turns)
    table = torch.zeros(len(TASKS) * (turns + 1), 2, dtype=torch.float64, device=err.device)
    table[:, 0].index_add_(0, cell, err)
    table[:, 1].index_add_(0, cell, torch.ones_like(err))
    return table.reshape(len(TASKS), turns + 1, 2)


@functools.lru_cache(maxsize=8)
def task_weight_table(weights: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """diffusion.loss_weights in TASKS order on `device`, made once (a host-to-device copy waits for the GPU)."""
    return torch.tensor(weights, device=device)
