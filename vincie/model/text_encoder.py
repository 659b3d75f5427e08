"""Text encoders behind one interface: `encode(texts) -> list of (L_i, D) tensors`.

- `hashed_words` (built in, for the synthetic world): lower-cased words hashed into `vocab_size` buckets (CRC32,
  stable across runs and machines), a start token, and a learned embedding table trained with the model.
- `hf`: a `transformers` encoder loaded from a local directory (never from a hub), frozen; its last hidden
  state is the text feature. The model's `text_proj` maps either width to the hidden size.
"""

from __future__ import annotations

import re
import zlib

import torch
import torch.nn as nn

from vincie.config import TextEncoderConfig
from vincie.errors import VincieError

WORD = re.compile(r"[a-z0-9]+")


class HashedWordEncoder(nn.Module):
    trainable = True

    def __init__(self, cfg: TextEncoderConfig, dim: int):
        super().__init__()
        self.vocab_size, self.max_tokens = cfg.vocab_size, cfg.max_tokens
        self.embed = nn.Embedding(cfg.vocab_size + 1, dim)  # id 0: start token
        # PyTorch's N(0, 1) init, not GPT's 0.02: words start as distinct vectors as large as the image tokens; the tiny
        # model learned the instruction sooner (docs/BENCHMARKS.md, "What was tried for the tiny preset", row 19)

    def tokenize(self, text: str) -> list[int]:
        words = WORD.findall(text.lower())
        ids = [0] + [1 + zlib.crc32(w.encode()) % self.vocab_size for w in words]
        return ids[:self.max_tokens]

    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        device = self.embed.weight.device
        return [self.embed(torch.tensor(self.tokenize(t), device=device)) for t in texts]


class HFTextEncoder(nn.Module):
    """A frozen `transformers` encoder from a local directory. Its weights are not part of vincie's
    checkpoints (they are referenced by path)."""
    trainable = False

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise VincieError("text_encoder.kind 'hf' needs the transformers package "
                              "(pip install transformers)") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
            model = AutoModel.from_pretrained(cfg.path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise VincieError(f"text_encoder.path {cfg.path}: not a loadable transformers model directory "
                              f"({str(exc).splitlines()[0]})") from None
        self.max_tokens = cfg.max_tokens
        model.requires_grad_(False).eval()
        object.__setattr__(self, "model", model)  # kept out of the state dict and out of .parameters()
        self.dim = model.config.hidden_size

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(device)
        hidden = self.model(**batch).last_hidden_state  # (N, L, D)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        return [hidden[i, :n].float() for i, n in enumerate(lengths)]

    def to(self, *args, **kwargs):
        self.model.to(*args, **kwargs)
        return super().to(*args, **kwargs)


def prompts(template: str, instructions: list[str], first_turn: int = 0) -> list[str]:
    """Instructions of consecutive turns (from `first_turn`) -> the texts the encoder reads
    (text_encoder.prompt_template)."""
    if not template:
        return list(instructions)
    return [template.format(instruction=text.strip().strip("."), turn=turn, next_turn=turn + 1)
            for turn, text in enumerate(instructions, start=first_turn)]


def build_text_encoder(cfg: TextEncoderConfig, dim: int) -> nn.Module:
    if cfg.kind == "hashed_words":
        return HashedWordEncoder(cfg, dim)
    return HFTextEncoder(cfg)
