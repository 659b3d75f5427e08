"""The released VINCIE DiT's inputs, laid out for vincie's MM-DiT with the release options (docs/release.md).

The release packs sessions one after another (its "native resolution" layout) and vincie runs one session per row:

    vid        (L, 2C+1)  per latent cell: [noisy latent, clean latent or 0, context flag], each session's cells
                          frame by frame, row-major; vid_shape (B, 3) = (frames, rows, cols) per session
    text       (N, D)     text-encoder features per prompt, prompts one after another; text_lengths (P,) tokens per
                          prompt; prompts (B,) prompts per session (ids 0, 1, ... within a session)
    timestep   (B,)       one per session in [0, 1000]: it conditions every token of the session, text included

Each row holds a session's latent tokens (its cells in p x p patches, channel-major as vincie.model.batch.patchify)
and then its text: per prompt a turn-token slot (the learned prompt-id vector, model.turn_token) and the prompt's
features. Attention is full within the session. RoPE: a text token's position is its index in the session's text,
on all three axes; a latent token's is (time, row, col) with time = frame + the session's text length (3B) or
frame (7B) (`model.rope_time`: after_text or image_index).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vincie.config import ModelConfig
from vincie.model.attention import MaskSpec
from vincie.model.batch import patchify, unpatchify
from vincie.model.diffusion import euler_sample
from vincie.model.mmdit import ModelInputs
from vincie.model.sequence import BlockType

T_SCALE = 1000.0  # the release's timesteps run over [0, T]; vincie's over [0, 1]


@dataclass
class ReleaseBatch:
    vid: torch.Tensor  # (L, 2C+1): per latent cell [noisy, clean or 0, context flag]
    vid_shape: torch.Tensor  # (B, 3) int
    text: torch.Tensor  # (N, D)
    text_lengths: torch.Tensor  # (P,) int
    prompts: torch.Tensor  # (B,) int
    timestep: torch.Tensor  # (B,) in [0, 1000]


def session_slices(lengths: list[int]) -> list[slice]:
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]


def latent_tokens(cfg: ModelConfig, vid: torch.Tensor, vid_shape: torch.Tensor) -> torch.Tensor:
    """Per latent cell (L, C_in), sessions one after another -> the rows' latent tokens (N_lat, C_in*p*p), in the
    order of ModelInputs.latent_index (session after session, each frame by frame in p x p patches)."""
    shapes = vid_shape.tolist()
    tokens = [patchify(vid[cells].reshape(f, h, w, -1).permute(0, 3, 1, 2), cfg.patch_size)  # (F, n, C_in*p*p)
              for (f, h, w), cells in zip(shapes, session_slices([f * h * w for f, h, w in shapes]))]
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in tokens])


def block_t(timestep: torch.Tensor) -> torch.Tensor:
    """(B,) release timesteps in [0, 1000] -> ModelInputs.block_t (B, 3): the session's latent and text blocks at
    its timestep, padding at 0."""
    t = timestep.float() / T_SCALE
    return torch.stack([t, t, torch.zeros_like(t)], dim=1)


def release_inputs(cfg: ModelConfig, batch: ReleaseBatch) -> ModelInputs:
    """The release's inputs -> ModelInputs, one session per row (rows padded to the longest)."""
    p = cfg.patch_size
    shapes = [tuple(int(x) for x in s) for s in batch.vid_shape.tolist()]
    prompt_rows = session_slices([int(n) for n in batch.prompts.tolist()])
    word_rows = session_slices(batch.text_lengths.tolist())
    B = len(shapes)

    text_rows, turn_rows, pos_rows, latent_counts = [], [], [], []
    for b, (f, h, w) in enumerate(shapes):
        text, turns = [], []
        for turn, k in enumerate(range(prompt_rows[b].start, prompt_rows[b].stop)):
            words = batch.text[word_rows[k]]
            text += [words.new_zeros(1, words.shape[1]), words]
            turns += [turn] + [-1] * words.shape[0]
        text_len = len(turns)
        gh, gw = h // p, w // p
        frame, row, col = torch.meshgrid(torch.arange(f), torch.arange(gh), torch.arange(gw), indexing="ij")
        time = frame + (text_len if cfg.rope_time == "after_text" else 0)
        latent_pos = torch.stack([time, row, col], dim=-1).reshape(-1, 3)
        text_pos = torch.arange(text_len)[:, None].expand(-1, 3)
        latent_counts.append(f * gh * gw)
        text_rows.append(torch.cat(text))
        turn_rows.append(torch.tensor(turns))
        pos_rows.append(torch.cat([latent_pos, text_pos]))

    T = max(len(pos) for pos in pos_rows)
    # blocks: 0 the session's latent tokens (IMAGE), 1 its text (TEXT: the text stream's modulation), 2 padding
    token_block = torch.full((B, T), 2, dtype=torch.int64)
    token_sample = -1 - torch.arange(T).repeat(B, 1)
    positions = torch.zeros(T, B, 3, dtype=torch.int64)
    latent_index, text_index = [], []
    for b, n_lat in enumerate(latent_counts):
        n_all = pos_rows[b].shape[0]
        token_block[b, :n_lat], token_block[b, n_lat:n_all] = 0, 1
        token_sample[b, :n_all] = 0
        positions[:n_all, b] = pos_rows[b]
        latent_index.append(torch.arange(n_lat) * B + b)
        text_index.append(torch.arange(n_lat, n_all) * B + b)
    return ModelInputs(
        text_tokens=torch.cat(text_rows), latent_tokens=latent_tokens(cfg, batch.vid, batch.vid_shape),
        text_index=torch.cat(text_index), latent_index=torch.cat(latent_index), positions=positions,
        block_t=block_t(batch.timestep),
        block_type=torch.tensor([int(BlockType.IMAGE), int(BlockType.TEXT), int(BlockType.IMAGE)]).repeat(B, 1),
        block_turn=torch.zeros(B, 3, dtype=torch.int64),
        mask=MaskSpec(token_block, token_sample, torch.zeros(B, 3, dtype=torch.bool), full_attention=True),
        text_turn=torch.cat(turn_rows))


def release_output(cfg: ModelConfig, out: torch.Tensor, vid_shape: torch.Tensor) -> torch.Tensor:
    """The model's output per latent token [N_lat, C*p*p] (rows in order) -> per latent cell (L, C), the release's
    layout."""
    p, c = cfg.patch_size, cfg.latent_channels
    cells, start = [], 0
    for f, h, w in vid_shape.tolist():
        n = f * (h // p) * (w // p)
        grid = unpatchify(out[start:start + n].reshape(f, -1, c * p * p), p, c, (h // p, w // p))  # (F, C, h, w)
        cells.append(grid.permute(0, 2, 3, 1).reshape(-1, c))
        start += n
    return torch.cat(cells)


@torch.no_grad()
def release_sample(model, cfg: ModelConfig, noise: torch.Tensor, cond: torch.Tensor, vid_shape: torch.Tensor,
                   text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                   negative: tuple[torch.Tensor, torch.Tensor, torch.Tensor], steps: int, shift: float,
                   cfg_scale: float) -> torch.Tensor:
    """The release's sampling: every latent cell of the session (context frames included) starts as noise and is
    integrated with Euler steps from t = 1 to 0 on shifted timesteps (the release's trailing timesteps and its
    final jump to the clean estimate are the same steps); `cond` (L, C+1) holds the clean context and its flag;
    guidance runs the model again with all text replaced by the negative prompt (`negative`: features, lengths
    and prompts per session, one prompt each) and returns neg + scale (pos - neg). `text`: (features, lengths,
    prompts). -> (L, C) latents; the release keeps each session's last frame."""
    B = vid_shape.shape[0]
    # the sequence of each text is laid out once; a step changes only the noisy latents and the timestep
    layouts = [release_inputs(cfg, ReleaseBatch(torch.cat([noise, cond], dim=-1), vid_shape, *words,
                                                torch.zeros(B)))
               for words in ([text] if cfg_scale == 1.0 else [text, negative])]

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        tokens = latent_tokens(cfg, torch.cat([x, cond], dim=-1), vid_shape)
        times = block_t(torch.full((B,), t * T_SCALE))
        pos, *neg = [release_output(cfg, model(dataclasses.replace(inputs, latent_tokens=tokens, block_t=times)),
                                    vid_shape) for inputs in layouts]
        return pos if not neg else neg[0] + cfg_scale * (pos - neg[0])

    return euler_sample(velocity, noise, steps, shift)
