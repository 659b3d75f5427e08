"""Operations: Kubernetes jobs, run reports, layout planning."""
