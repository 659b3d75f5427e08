"""Run configuration: plain dataclasses (sections.py), loaded from a preset or YAML file and overridden with
`key.sub=value` (load.py), validated in one place (rules.py).

A config source is a preset name (`tiny` -> launch/configs/tiny.yaml, shipped inside the package) or a YAML path.
Keys the file leaves out keep the dataclass defaults. Every problem (bad YAML, unknown key, wrong type,
inconsistent values) raises `ConfigError` with one line naming the key, before any work starts. The names below
are the package's interface; import them from `vincie.config`.
"""

from vincie.config.load import (
                                add_config_arguments,
                                config_from_args,
                                from_dict,
                                load_config,
                                preset_dir,
                                read_yaml,
                                to_dict,
                                to_yaml,
)
from vincie.config.rules import check_model_parallel, check_world, validate, validate_synth
from vincie.config.sections import (
                                BACKGROUNDS,
                                TE_INSTALL,
                                TRANSITIONS,
                                Config,
                                DataConfig,
                                DiffusionConfig,
                                IngestConfig,
                                K8sConfig,
                                LoRAConfig,
                                MetricsConfig,
                                ModelConfig,
                                ParallelConfig,
                                RunConfig,
                                SequenceConfig,
                                StorageConfig,
                                SynthConfig,
                                TextEncoderConfig,
                                TrainConfig,
                                VAEConfig,
                                VLMConfig,
                                bucket_shapes,
                                ffn_hidden_size,
                                fp8_alignment,
                                fp8_gemm_shapes,
                                have_transformer_engine,
                                head_dim,
                                latent_input_width,
)
from vincie.errors import ConfigError

__all__ = [
    "add_config_arguments", "config_from_args", "from_dict", "load_config", "preset_dir", "read_yaml", "to_dict",
    "to_yaml", "BACKGROUNDS", "TE_INSTALL", "TRANSITIONS", "Config", "DataConfig", "DiffusionConfig", "IngestConfig",
    "K8sConfig", "LoRAConfig", "MetricsConfig", "ModelConfig", "ParallelConfig", "RunConfig", "SequenceConfig",
    "StorageConfig", "SynthConfig", "TextEncoderConfig", "TrainConfig", "VAEConfig", "VLMConfig", "bucket_shapes",
    "ffn_hidden_size", "fp8_alignment", "fp8_gemm_shapes", "have_transformer_engine", "head_dim", "latent_input_width",
    "check_model_parallel", "check_world", "validate", "validate_synth", "ConfigError",
]
