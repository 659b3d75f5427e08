"""Evaluation: the synthetic benchmark's judge, public benchmarks, similarity metrics, the VLM judge."""
