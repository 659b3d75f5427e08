"""Real video -> sessions (`vincie data ingest`): scenes, regions, annotators."""
