"""Text encoders behind one interface: `encode(texts) -> list of (L_i, D) tensors`.

- `hashed_words` (built in, for the synthetic world): lower-cased words hashed into `vocab_size` buckets (CRC32,
  stable across runs and machines), a start token, and a learned embedding table trained with the model.
- `hf`: a `transformers` encoder loaded from a local directory (never from a hub), frozen; its last hidden
  state is the text feature. The model's `text_proj` maps either width to the hidden size.
- the released VINCIE's encoders, frozen, from local directories, tokenized as the release tokenizes:
  `t5` (the 7B's flan-ul2): a T5 encoder's last hidden states over the tokens its tokenizer gives, the closing
  </s> included, at most text_encoder.max_tokens (150); `causal_lm` (the 3B's llm14b): a causal LM's decoder
  (`.transformer`, as the 14B's own code names it, else `.model`), its last hidden states over the text and an
  end-of-document token "<|endoftext|>" written after it (over the last token when the text fills max_tokens).
  The release pads every text to max_tokens and masks the padding; both encoders' outputs at the real tokens do
  not depend on it (masked attention; a causal LM's tokens never see later ones), so vincie pads a batch only to
  its longest text.
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


END_OF_DOCUMENT = "<|endoftext|>"  # the 3B's llm14b: its end-of-document token, also its padding


class HFTextEncoder(nn.Module):
    """A frozen `transformers` text model from a local directory (kinds hf, t5, causal_lm). Its weights are not
    part of vincie's checkpoints (they are referenced by path)."""
    trainable = False

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        try:
            import transformers
        except ImportError:
            raise VincieError(f"text_encoder.kind '{cfg.kind}' needs the transformers package "
                              "(pip install transformers)") from None
        model_class = {"hf": transformers.AutoModel, "t5": transformers.T5EncoderModel,
                       "causal_lm": transformers.AutoModelForCausalLM}[cfg.kind]
        remote = {"trust_remote_code": True} if cfg.trust_remote_code else {}
        tokenizer_options = {"use_fast": False, "padding_side": "right", "truncation_side": "right",
                             "add_eod_token": True} if cfg.kind == "causal_lm" else {}  # as the release loads llm14b
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.path, local_files_only=True,
                                                                        **tokenizer_options, **remote)
            model = model_class.from_pretrained(cfg.path, local_files_only=True, **remote)
        except (OSError, ValueError) as exc:
            hint = "" if cfg.trust_remote_code else "; a model with its own code needs text_encoder.trust_remote_code"
            raise VincieError(f"text_encoder.path {cfg.path}: not a loadable transformers model directory "
                              f"({str(exc).splitlines()[0]}{hint})") from None
        self.kind, self.max_tokens = cfg.kind, cfg.max_tokens
        if cfg.kind == "causal_lm":
            self.tokenizer.add_special_tokens({"pad_token": END_OF_DOCUMENT})
            model = getattr(model, "transformer", None) or model.model  # the decoder, without the LM head
        model.requires_grad_(False).eval()
        object.__setattr__(self, "model", model)  # kept out of the state dict and out of .parameters()
        self.dim = model.config.hidden_size

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.kind == "causal_lm":  # the end-of-document token after each text (over its last token when full)
            lengths = mask.sum(dim=1)
            if int(lengths.max()) < self.max_tokens:
                ids, mask = nn.functional.pad(ids, (0, 1)), nn.functional.pad(mask, (0, 1))
            where = lengths.clamp(max=ids.shape[1] - 1)
            rows = torch.arange(len(texts))
            ids[rows, where] = self.tokenizer.pad_token_id
            mask[rows, where] = 1
            hidden = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        elif self.kind == "t5":
            hidden = self.model(input_ids=ids.to(device), attention_mask=mask.to(device))
        else:
            hidden = self.model(**{k: v.to(device) for k, v in batch.items()})
        hidden = hidden.last_hidden_state  # (N, L, D)
        return [hidden[i, :n].float() for i, n in enumerate(mask.sum(dim=1).tolist())]

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
