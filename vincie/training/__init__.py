"""Training: the trainer, parallelism on megatron-core, checkpoints, metrics."""
