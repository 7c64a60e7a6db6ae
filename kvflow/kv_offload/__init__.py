"""The second KV tier: prefix-cache blocks evicted from the KV cache, kept in host memory
and on disk, loaded back instead of recomputed."""
