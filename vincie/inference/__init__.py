"""Multi-turn editing: the editor and its KV cache, exported models."""
