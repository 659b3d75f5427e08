"""The training loader: the order of sessions from the index, reading, decoding to buckets."""
