"""Launch configs (configs/*.yaml, shipped as package data) and, later, local multi-process launching."""
