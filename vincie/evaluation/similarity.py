"""Image metrics of the multi-turn benchmarks, as MagicBrush defines them (its evaluation/image_eval.py):

- L1: mean absolute difference of RGB in [0, 1], the edited image resized (bicubic) to the ground truth's size;
- CLIP-I: cosine similarity of the CLIP image embeddings of the edited image and the ground truth;
- DINO: cosine similarity of the DINO ViT's class-token features of the two;
- CLIP-T: cosine similarity of the edited image's CLIP embedding and the CLIP text embedding of a description
  of the target (MagicBrush's caption of the ground truth; the instruction where a benchmark has none).

CLIP and DINO are `transformers` models read from local directories (`--clip-model`, `--dino-model`; e.g. copies
of openai/clip-vit-base-patch32 and facebook/dino-vits16, with their image processor and, for CLIP, tokenizer
files); nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vincie.errors import VincieError


def l1(edited: np.ndarray, truth: np.ndarray) -> float:
    """edited, truth (H, W, 3) uint8 of any sizes -> mean |edited - truth| in [0, 1] at the truth's size."""
    h, w = truth.shape[:2]
    resized = np.asarray(Image.fromarray(edited).resize((w, h), Image.BICUBIC), dtype=np.float64)
    return float(np.abs(resized - truth.astype(np.float64)).mean() / 255)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1))


def projected(output) -> torch.Tensor:
    """CLIP's get_*_features: a tensor in transformers 4, an output whose pooler_output holds it in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_local(path: str, flag: str, with_tokenizer: bool):
    try:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
    except ImportError:
        raise VincieError(f"{flag} needs the transformers package (pip install transformers)") from None
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True) if with_tokenizer else None
    except (OSError, ValueError) as exc:
        raise VincieError(f"{flag} {path}: not a loadable transformers model directory with its image processor"
                          f"{' and tokenizer' if with_tokenizer else ''} ({str(exc).splitlines()[0]})") from None
    return model, processor, tokenizer


class Clip:
    """CLIP image and text embeddings from a local `transformers` CLIPModel directory."""

    def __init__(self, path: str):
        self.model, self.processor, self.tokenizer = load_local(path, "--clip-model", with_tokenizer=True)
        if not hasattr(self.model, "get_image_features"):
            raise VincieError(f"--clip-model {path}: {type(self.model).__name__} is not a CLIP model")

    @torch.no_grad()
    def image(self, picture: np.ndarray) -> torch.Tensor:
        pixels = self.processor(images=Image.fromarray(picture), return_tensors="pt")["pixel_values"]
        return projected(self.model.get_image_features(pixel_values=pixels))[0]

    @torch.no_grad()
    def text(self, text: str) -> torch.Tensor:
        tokens = self.tokenizer([text], padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
        return projected(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                      attention_mask=tokens["attention_mask"]))[0]


class Dino:
    """The class token of a DINO ViT (`transformers` ViTModel directory) as the image feature."""

    def __init__(self, path: str):
        self.model, self.processor, _ = load_local(path, "--dino-model", with_tokenizer=False)

    @torch.no_grad()
    def image(self, picture: np.ndarray) -> torch.Tensor:
        pixels = self.processor(images=Image.fromarray(picture), return_tensors="pt")["pixel_values"]
        return self.model(pixel_values=pixels).last_hidden_state[0, 0]


def turn_metrics(edited: np.ndarray, truth: np.ndarray | None, description: str, clip: Clip | None,
                 dino: Dino | None) -> dict[str, float]:
    """The metrics that apply to one edited turn: those against the ground truth when there is one, CLIP-T when a
    CLIP model is given."""
    scores = {}
    if truth is not None:
        scores["l1"] = l1(edited, truth)
        if clip is not None:
            scores["clip_i"] = cosine(clip.image(edited), clip.image(truth))
        if dino is not None:
            scores["dino"] = cosine(dino.image(edited), dino.image(truth))
    if clip is not None:
        scores["clip_t"] = cosine(clip.image(edited), clip.text(description))
    return scores
