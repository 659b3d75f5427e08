"""From sessions to model inputs: encode images, masks and text; lay out blocks; noise the targets; collate rows.

Randomness comes only from the generators passed in (numpy for context dropout, torch for timesteps and noise),
which the trainer seeds from (seed, step, rank): a step's batch is a pure function of its data and that seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from vincie.config import Config, ModelConfig, bucket_shapes
from vincie.model.attention import MaskSpec
from vincie.model.diffusion import noisy, sample_timesteps, velocity_target
from vincie.model.flops import Workload, batch_workload
from vincie.model.mmdit import ModelInputs
from vincie.model.sequence import (
    TASKS,
    Block,
    BlockType,
    Layout,
    Role,
    build_blocks,
    full_attention_blocks,
    layout,
    pack,
    release_blocks,
)
from vincie.model.text_encoder import prompts
from vincie.sessions.loaded import LoadedSession


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [-1, 1]."""
    return torch.tensor(image).permute(2, 0, 1).float() / 127.5 - 1


def masks_to_pixels(masks: torch.Tensor) -> torch.Tensor:
    """(M, H, W) bool -> (M, 3, H, W) in {-1, 1}: masks rendered as images (white region on black)."""
    return masks.float().mul(2).sub(1)[:, None].expand(-1, 3, -1, -1)


def tensor_to_image(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def patchify(latents: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/p * w/p, C*p*p), row-major over the token grid."""
    n, c, h, w = latents.shape
    x = latents.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, p: int, c: int, grid: tuple[int, int]) -> torch.Tensor:
    """(N, gh*gw, C*p*p) -> (N, C, gh*p, gw*p)."""
    n = tokens.shape[0]
    gh, gw = grid
    x = tokens.reshape(n, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c, gh * p, gw * p)


@dataclass
class SampleTokens:
    """One sequence, ready to collate. Latent lists follow the order of the latent blocks in `blocks`."""
    blocks: list[Block]
    text: list[torch.Tensor]  # per TEXT block: (L, D_text)
    latents: list[torch.Tensor]  # per latent block: (n, P) model input (noisy for NOISY blocks)
    targets: list[torch.Tensor | None]  # per latent block: velocity target for NOISY blocks
    block_t: torch.Tensor  # (NB,)
    grid: tuple[int, int]
    full_attention: bool
    weights: list[torch.Tensor | None] | None = None  # per latent block: (n,) loss weight per target token
    sources: list[torch.Tensor | None] | None = None  # per latent block, with model.source: see source_tokens
    block_text: torch.Tensor | None = None  # (NB, D_text) with model.pooled_text: see pooled_text
    turn_slots: bool = False  # model.turn_token: each TEXT block's first token is its turn's learned token's slot
    rope_time: str = "offset"  # model.rope_time


@dataclass
class Batch:
    inputs: ModelInputs
    target: torch.Tensor  # (N_target, P) velocity targets of the NOISY latent tokens
    target_select: torch.Tensor  # (N_lat,) bool: which latent tokens are NOISY (carry the loss)
    target_index: torch.Tensor  # (N_target,) int64: where target_select is True (made on the host: no device wait)
    target_task: torch.Tensor  # (N_target,) int: index into TASKS
    target_t: torch.Tensor  # (N_target, 1) float: the timestep of each NOISY latent token
    target_weight: torch.Tensor  # (N_target,) float: loss weight per target token (diffusion.changed_region_weight)
    # (N_target,) int: the edit turn a target token belongs to: k for the image I_k and the masks of turn k
    # (1-based); 0 for the session's first image (release mode gives it a target too)
    target_turn: torch.Tensor
    num_samples: int
    work: Workload  # what the batch's model FLOPs depend on (vincie.model.flops), counted on the host

    def without_targets(self) -> "Batch":
        """The same inputs carrying no loss (no target tokens, no samples): what fills a schedule's micro-batch
        groups with the shape of the others."""
        return dataclasses.replace(self, target=self.target[:0], target_select=torch.zeros_like(self.target_select),
                                   target_index=self.target_index[:0], target_task=self.target_task[:0],
                                   target_t=self.target_t[:0], target_weight=self.target_weight[:0],
                                   target_turn=self.target_turn[:0], num_samples=0)

    @property
    def target_inputs(self) -> torch.Tensor:
        """(N_target, P): the noisy latents x_t of the target tokens (the first P values of each token's input,
        which with model.input_layout release also holds the clean latent and the context flag)."""
        return self.inputs.latent_tokens[self.target_index, :self.target.shape[1]]


def source_tokens(blocks: list[Block], latents: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Per latent block: for a NOISY block of turn k, the tokens (n, P) of the row's CLEAN image I_k (the image the
    turn edits), or None when the context dropped it; None for clean blocks. `latents` follow the latent blocks."""
    latent_blocks = [b for b in blocks if b.type != BlockType.TEXT]
    current = {b.source: x for b, x in zip(latent_blocks, latents)
               if b.type == BlockType.IMAGE and b.role == Role.CLEAN}
    return [current.get(b.turn) if b.role == Role.NOISY else None for b in latent_blocks]


def pooled_text(blocks: list[Block], text: list[torch.Tensor], dim: int) -> torch.Tensor:
    """(NB, dim): for a NOISY block of turn k, the mean of the row's instruction T_k (its TEXT block's features,
    detached: the text encoder trains through attention); zeros for other blocks and where T_k was dropped."""
    instruction = {b.turn: t for b, t in zip([b for b in blocks if b.type == BlockType.TEXT], text)}
    out = torch.zeros(len(blocks), dim)
    for j, b in enumerate(blocks):
        if b.role == Role.NOISY and b.turn in instruction:
            out[j] = instruction[b.turn].detach().float().mean(dim=0).cpu()
    return out


def edit_conditioning(m: ModelConfig, blocks: list[Block], latents: list[torch.Tensor], text: list[torch.Tensor]
                      ) -> tuple[list[torch.Tensor | None] | None, torch.Tensor | None]:
    """A sequence's optional target conditioning, as the model config asks for it (None where off): the image
    each target edits (model.source) and its turn's pooled instruction (model.pooled_text)."""
    sources = source_tokens(blocks, latents) if m.source != "none" else None
    block_text = pooled_text(blocks, text, m.text_dim) if m.pooled_text else None
    return sources, block_text


def element_key(block: Block) -> tuple[str, int]:
    return {BlockType.IMAGE: "image", BlockType.CUR_MASK: "cur", BlockType.NEXT_MASK: "next"}[block.type], \
        block.source


class SessionEncoder:
    """Encodes sessions with the configured VAE and text encoder into training sequences."""

    def __init__(self, cfg: Config, vae, text_encoder, device: torch.device):
        self.cfg, self.vae, self.text_encoder, self.device = cfg, vae, text_encoder, device
        self.p = cfg.model.patch_size

    def grid(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae.factor * self.p
        return height // f, width // f

    @torch.no_grad()
    def encode_elements(self, session: LoadedSession) -> dict[tuple[str, int], torch.Tensor]:
        """Every image and mask of a session -> patch tokens (n, P): one VAE call, or the precomputed latents.
        Order: images, then per turn its cur and next mask."""
        keys = [("image", i) for i in range(session.turns + 1)]
        if session.has_masks:
            keys += [(kind, i) for i in range(session.turns) for kind in ("cur", "next")]
        if session.latents is not None:
            parts = [session.latents["image"]]  # (K+1, C, h, w)
            if session.has_masks:  # (K, 2, C, h, w) -> (2K, C, h, w): cur_0, next_0, cur_1, ...
                parts.append(torch.stack([session.latents["cur"], session.latents["next"]], 1).flatten(0, 1))
            latents = torch.cat(parts).to(self.device)
        else:
            parts = [session.images]  # (K+1, 3, H, W)
            if session.has_masks:
                parts.append(masks_to_pixels(torch.stack([session.cur_masks, session.next_masks], 1).flatten(0, 1)))
            latents = self.vae.encode(torch.cat(parts).to(self.device))
        tokens = patchify(latents.float(), self.p)
        return dict(zip(keys, tokens))

    def fit_blocks(self, session: LoadedSession, rng: np.random.Generator, text_lengths: list[int],
                   tokens_per_element: int) -> list[Block]:
        """Block-causal blocks with context dropout, keeping whole turns from the start until the token cap."""
        for turns in range(session.turns, 0, -1):
            blocks = build_blocks(turns, session.has_masks, self.cfg.sequence, rng)
            if self.cfg.sequence.mode == "full":
                blocks = full_attention_blocks(blocks, rng)
            count = sum(text_lengths[b.source] if b.type == BlockType.TEXT else tokens_per_element for b in blocks)
            if count <= self.cfg.data.max_tokens:
                return blocks
        raise ValueError(f"session {session.key}: even one turn needs more than data.max_tokens="
                         f"{self.cfg.data.max_tokens} tokens")

    def region_weights(self, session: LoadedSession, turn: int, grid: tuple[int, int]) -> torch.Tensor | None:
        """(n,) loss weights of the image after `turn`: diffusion.changed_region_weight on tokens that touch the
        turn's changed region (C | N), 1 elsewhere; None when off or without mask pixels (no masks, or
        precomputed latents)."""
        weight = self.cfg.diffusion.changed_region_weight
        if weight == 1.0 or session.cur_masks is None:
            return None
        region = session.cur_masks[turn] | session.next_masks[turn]  # (H, W) bool
        gh, gw = grid
        touched = region.reshape(gh, region.shape[0] // gh, gw, region.shape[1] // gw).any(dim=3).any(dim=1)
        return 1.0 + (weight - 1.0) * touched.reshape(-1).float()

    def instruction_features(self, session: LoadedSession) -> list[torch.Tensor]:
        """Per instruction (L, D_text): precomputed or encoded now; with model.turn_token a zero row first, the
        slot of the turn's learned token."""
        texts = [t.to(self.device) for t in session.text] if session.text is not None else \
            self.text_encoder.encode(prompts(self.cfg.text_encoder.prompt_template, session.instructions))
        return with_turn_slots(texts, self.cfg.model.turn_token)

    def sample_tokens(self, blocks, text, latents, targets, block_t, grid, weights=None, sources=None,
                      block_text=None) -> SampleTokens:
        m = self.cfg.model
        return SampleTokens(blocks, text, latents, targets, block_t, grid, self.cfg.sequence.mode != "block_causal",
                            weights, sources, block_text, m.turn_token, m.rope_time)

    def training_sample(self, session: LoadedSession, rng: np.random.Generator,
                        generator: torch.Generator, t: float | None = None) -> SampleTokens:
        """A training sequence of `session`: context dropout from `rng`, timesteps and noise from `generator`;
        `t` given: every NOISY block at that timestep (validation's fixed timesteps)."""
        if self.cfg.sequence.mode == "release":
            return self.release_sample(session, rng, generator, t)
        elements = self.encode_elements(session)
        texts = self.instruction_features(session)
        grid = self.grid(*session.size)
        blocks = self.fit_blocks(session, rng, [len(t) for t in texts], grid[0] * grid[1])
        d = self.cfg.diffusion
        t_noisy = (sample_timesteps(len(blocks), d.logit_normal_loc, d.logit_normal_scale, generator) if t is None
                   else torch.full((len(blocks),), float(t)))
        block_t = torch.where(torch.tensor([b.role == Role.NOISY for b in blocks]), t_noisy, torch.zeros(()))
        text, latents, targets, weights = [], [], [], []
        for j, block in enumerate(blocks):
            if block.type == BlockType.TEXT:
                text.append(texts[block.source])
                continue
            x0 = elements[element_key(block)]
            if block.role == Role.NOISY:
                noise = torch.randn(x0.shape, generator=generator).to(x0.device)
                latents.append(noisy(x0, noise, block_t[j]))
                targets.append(velocity_target(x0, noise))
                weights.append(self.region_weights(session, block.source - 1, grid)
                               if block.type == BlockType.IMAGE else None)
            else:
                latents.append(x0)
                targets.append(None)
                weights.append(None)
        sources, block_text = edit_conditioning(self.cfg.model, blocks, latents, text)
        latent_blocks = [b for b in blocks if b.type != BlockType.TEXT]
        latents = [layout_input(x, b.role == Role.CLEAN, self.cfg.model.input_layout, self.p)
                   for b, x in zip(latent_blocks, latents)]
        return self.sample_tokens(blocks, text, latents, targets, block_t, grid, weights, sources, block_text)

    def release_sample(self, session: LoadedSession, rng: np.random.Generator,
                       generator: torch.Generator, t: float | None = None) -> SampleTokens:
        """sequence.mode release: the session's images (as many whole turns as data.max_tokens holds) all noised at
        one timestep, each with its velocity target; each image token's input is [noisy, clean or 0, context
        flag] (model.input_layout release: every image but the last is context); then the instructions; every
        block conditioned on that timestep (model.conditioning timestep)."""
        elements = self.encode_elements(session)
        texts = self.instruction_features(session)
        grid = self.grid(*session.size)
        n = grid[0] * grid[1]
        turns = next((k for k in range(session.turns, 0, -1)
                      if (k + 1) * n + sum(len(t) for t in texts[:k]) <= self.cfg.data.max_tokens), None)
        if turns is None:
            raise ValueError(f"session {session.key}: even one turn needs more than data.max_tokens="
                             f"{self.cfg.data.max_tokens} tokens")
        blocks = release_blocks(turns, self.cfg.sequence, rng)
        d = self.cfg.diffusion
        t = sample_timesteps(1, d.logit_normal_loc, d.logit_normal_scale, generator)[0] if t is None else float(t)
        text, latents, targets, weights = [], [], [], []
        for block in blocks:
            if block.type == BlockType.TEXT:
                text.append(texts[block.source])
                continue
            x0 = elements[("image", block.source)]
            noise = torch.randn(x0.shape, generator=generator).to(x0.device)
            latents.append(release_tokens(noisy(x0, noise, t), x0 if block.source < turns else None, self.p))
            targets.append(velocity_target(x0, noise))
            weights.append(self.region_weights(session, block.source - 1, grid) if block.source > 0 else None)
        return self.sample_tokens(blocks, text, latents, targets, torch.full((len(blocks),), float(t)), grid,
                                  weights)

    def null_sample(self) -> SampleTokens:
        """A sample that carries no loss (no target tokens): what a data-parallel rank trains on when every session
        of its step was bad, so that it still takes part in the step's collectives."""
        h, w = bucket_shapes(self.cfg)[0]
        blank = LoadedSession(key="(none)", instructions=[""], has_masks=False, size=(h, w),
                              images=torch.zeros(2, 3, h, w), cur_masks=None, next_masks=None)
        sample = self.training_sample(blank, np.random.default_rng(0), torch.Generator().manual_seed(0))
        return dataclasses.replace(sample, targets=[None] * len(sample.targets))


def release_tokens(x_t: torch.Tensor, context: torch.Tensor | None, p: int) -> torch.Tensor:
    """model.input_layout release: tokens (n, C*p*p) at their noise level, and the clean latent of a context image
    (None for the image being generated) -> (n, (2C + 1)*p*p): [x_t, clean or 0, context flag]."""
    flag = torch.full((x_t.shape[0], p * p), float(context is not None), device=x_t.device, dtype=x_t.dtype)
    return torch.cat([x_t, torch.zeros_like(x_t) if context is None else context, flag], dim=1)


def layout_input(tokens: torch.Tensor, clean: bool, input_layout: str, p: int) -> torch.Tensor:
    """A latent block's tokens (n, C*p*p) -> its model input: as they are, or with model.input_layout release
    [x, x, 1] for a clean (context) block (its latent at t = 0 is itself) and [x_t, 0, 0] for a NOISY one."""
    if input_layout != "release":
        return tokens
    return release_tokens(tokens, tokens if clean else None, p)


def with_turn_slots(texts: list[torch.Tensor], turn_token: bool) -> list[torch.Tensor]:
    """Per instruction (L, D) -> (1 + L, D) with a zero row first (the turn token's slot) when `turn_token`."""
    return [torch.cat([t.new_zeros(1, t.shape[1]), t]) for t in texts] if turn_token else list(texts)


def num_tokens(sample: SampleTokens) -> int:
    return sum(len(t) for t in sample.text) + sum(len(x) for x in sample.latents)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices (into `lengths`, tokens per sample) grouped into rows of at most `capacity` tokens: as many
    rows as the samples that fit need at least (ceil(their total / capacity)), each sample, longest first, into
    the least-filled row with room, a new row when none has; a sample longer than `capacity` gets a row of its own.
    Rows of one micro-batch are padded to its longest, so rows of even length waste the least. Rows come shortest
    first."""
    rows: list[list[int]] = [[] for _ in range(-(-sum(n for n in lengths if n <= capacity) // capacity))]
    load = [0] * len(rows)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if load[r] + lengths[i] <= capacity]
        if fits:
            r = min(fits, key=lambda r: load[r])
        else:
            rows.append([])
            load.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        load[r] += lengths[i]
    return [row for _, row in sorted((load[r], row) for r, row in enumerate(rows) if row)]


def sample_layout(s: SampleTokens) -> Layout:
    """The token layout (block ids, positions) of one sequence."""
    # layout() indexes text lengths by block.source; map each TEXT block's source to its own length
    by_source = {b.source: len(t) for b, t in zip([b for b in s.blocks if b.type == BlockType.TEXT], s.text)}
    lengths = [by_source.get(i, 0) for i in range(max(by_source, default=-1) + 1)]
    return layout(s.blocks, lengths, s.grid, full_attention=s.full_attention, rope_time=s.rope_time)


def collate(samples: list[SampleTokens], device: torch.device, text_dim: int, length: int | None = None,
            latent_dim: int = 0, rows: list[list[int]] | None = None) -> Batch:
    """Rows padded to `length` tokens (default: the longest row); padding tokens attend only to themselves.
    `rows`: the samples of each row, packed one after the other (no attention between them); default one sample
    per row. `text_dim` / `latent_dim`: token widths for a batch without text / without latent tokens."""
    rows = rows if rows is not None else [[i] for i in range(len(samples))]
    layouts = [pack([sample_layout(samples[i]) for i in row]) for row in rows]
    spec = MaskSpec.from_layouts(layouts, num_tokens=length)
    B, T = spec.token_block.shape
    NB = spec.block_noisy.shape[1]
    work = batch_workload(layouts, T)
    text_index, latent_index, text_tokens, latent_tokens, text_turn = [], [], [], [], []
    turn_slots = any(s.turn_slots for s in samples)
    targets, select, tasks, target_t, target_weight, target_turn = [], [], [], [], [], []
    with_sources = any(s.sources is not None for s in samples)
    block_text = torch.zeros(B, NB, text_dim) if any(s.block_text is not None for s in samples) else None
    sources = []
    positions = torch.zeros(T, B, 3, dtype=torch.int64)
    block_t = torch.zeros(B, NB)
    block_type = torch.zeros(B, NB, dtype=torch.int64)
    block_turn = torch.zeros(B, NB, dtype=torch.int64)
    for b, (row, l) in enumerate(zip(rows, layouts)):
        members = [samples[i] for i in row]
        positions[:l.num_tokens, b] = l.positions
        nb = len(l.blocks)
        block_t[b, :nb] = torch.cat([torch.as_tensor(s.block_t, dtype=block_t.dtype) for s in members])
        block_type[b, :nb] = torch.tensor([int(x.type) for x in l.blocks])
        block_turn[b, :nb] = torch.tensor([x.turn for x in l.blocks])
        if block_text is not None:
            block_text[b, :nb] = torch.cat([torch.zeros(len(s.blocks), text_dim) if s.block_text is None
                                            else s.block_text for s in members])
        texts = iter([t for s in members for t in s.text])
        latents = iter([item for s in members for item in
                        zip(s.latents, s.targets, s.weights or [None] * len(s.latents),
                            s.sources or [None] * len(s.latents))])
        for j, block in enumerate(l.blocks):
            start, n = int(l.block_start[j]), int(l.block_length[j])
            flat = torch.arange(start, start + n) * B + b
            if block.type == BlockType.TEXT:
                text_index.append(flat)
                text_tokens.append(next(texts))
                if turn_slots:
                    text_turn.append(torch.tensor([block.turn] + [-1] * (n - 1)))
            else:
                x, target, weight, source = next(latents)
                latent_index.append(flat)
                latent_tokens.append(x)
                sources.append(torch.zeros_like(x) if source is None else source)
                select.append(torch.full((n,), target is not None))
                if target is not None:
                    targets.append(target)
                    tasks.append(torch.full((n,), TASKS.index(block.task)))
                    target_turn.append(torch.full((n,), block.source + (block.type != BlockType.IMAGE)))
                    target_t.append(torch.full((n, 1), float(block_t[b, j])))
                    # on the latents' device: region weights come from masks, which a GPU decoder leaves there
                    target_weight.append(torch.ones(n, device=x.device) if weight is None else weight.to(x.device))
    inputs = ModelInputs(
        text_tokens=torch.cat(text_tokens) if text_tokens else torch.zeros(0, text_dim),
        latent_tokens=torch.cat(latent_tokens) if latent_tokens else torch.zeros(0, latent_dim),
        text_index=torch.cat(text_index) if text_index else torch.zeros(0, dtype=torch.int64),
        latent_index=torch.cat(latent_index) if latent_index else torch.zeros(0, dtype=torch.int64),
        positions=positions, block_t=block_t, block_type=block_type, block_turn=block_turn, mask=spec,
        latent_source=(torch.cat(sources) if sources else torch.zeros(0, latent_dim)) if with_sources else None,
        block_text=block_text,
        text_turn=(torch.cat(text_turn) if text_turn else torch.zeros(0, dtype=torch.int64)) if turn_slots else None,
    ).to(device)
    select = torch.cat(select) if select else torch.zeros(0, dtype=torch.bool)
    return Batch(inputs=inputs,
                 target=torch.cat(targets).to(device) if targets else torch.zeros(0, 1, device=device),
                 target_select=select.to(device), target_index=torch.nonzero(select)[:, 0].to(device),
                 target_task=torch.cat(tasks).to(device) if tasks else torch.zeros(0, dtype=torch.int64,
                                                                                     device=device),
                 target_t=torch.cat(target_t).to(device) if target_t else torch.zeros(0, 1, device=device),
                 target_weight=torch.cat(target_weight).to(device) if target_weight else torch.zeros(0, device=device),
                 target_turn=(torch.cat(target_turn) if target_turn else torch.zeros(0, dtype=torch.int64)).to(device),
                 num_samples=sum(len(row) for row in rows), work=work)
