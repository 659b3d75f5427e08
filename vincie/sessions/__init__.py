"""Sessions as stored: the session format, WebDataset shards, the session index, precomputed features."""
