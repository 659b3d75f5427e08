"""The trainable model and its frozen helpers, built from one config.

`EditModel` is what the optimizer, EMA and checkpoints see: the MM-DiT (or one pipeline stage of it) plus the
text encoder when that is trainable (the built-in hashed-word embeddings; only on the first pipeline stage, the
one that embeds tokens). Frozen encoders (a `transformers` text model, a `diffusers` VAE, the parameter-free
space-to-depth latent) stay outside it and are referenced by config.
"""

from __future__ import annotations

# megatron_layers is imported before megatron-core (it sets warning filters first): keep the order below
# isort: skip_file

import torch
import torch.nn as nn

from vincie.model.megatron_layers import MegatronLinears  # first: its warning filters precede megatron-core's import
from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402

from vincie.config import Config  # noqa: E402
from vincie.model.mmdit import MMDiT, ModelInputs  # noqa: E402
from vincie.model.text_encoder import build_text_encoder  # noqa: E402
from vincie.model.vae import build_vae  # noqa: E402


class EditModel(MegatronModule):
    def __init__(self, cfg: Config, text_encoder: nn.Module, stage: dict | None = None):
        """`stage`: this pipeline stage (layers, pre_process, post_process, sequence_parallel); none for the
        whole model."""
        stage = dict(stage or {})
        linears = MegatronLinears(cfg.model, sequence_parallel=stage.pop("sequence_parallel", False))
        dit = MMDiT(cfg.model, linears, **stage)
        dit.recompute = cfg.train.recompute == "full"
        super().__init__(linears.config)
        # read by megatron-core's pipeline schedules and finalize_model_grads (no word embedding tied to an output)
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = dit.pre_process, dit.post_process
        self.share_embeddings_and_output_weights = False
        self.dit = dit
        trainable = getattr(text_encoder, "trainable", False) and stage.get("pre_process", True)
        self.text_encoder = text_encoder if trainable else None

    def set_input_tensor(self, input_tensor) -> None:
        self.dit.set_input_tensor(input_tensor)

    def forward(self, inputs: ModelInputs) -> torch.Tensor:
        return self.dit(inputs)


def build_components(cfg: Config, device: torch.device, stages: list[dict] | None = None):
    """-> (EditModel, vae, text_encoder), on `device`; with `stages` (this rank's pipeline chunks, see
    vincie.training.parallel.model_stages) a list of EditModels, one per chunk."""
    text_encoder = build_text_encoder(cfg.text_encoder, cfg.model.text_dim)
    vae = build_vae(cfg.vae).to(device)
    if vae.channels != cfg.model.latent_channels:
        from vincie.config import ConfigError

        raise ConfigError(f"config key 'model.latent_channels' is {cfg.model.latent_channels} but the VAE gives "
                          f"{vae.channels} channels")
    model = [EditModel(cfg, text_encoder, stage).to(device) for stage in stages] if stages is not None \
        else EditModel(cfg, text_encoder).to(device)
    text_encoder.to(device)
    return model, vae, text_encoder
