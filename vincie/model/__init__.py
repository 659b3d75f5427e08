"""The MM-DiT and what feeds it: sequences and attention, the model, encoders, diffusion, batches, FLOPs."""
