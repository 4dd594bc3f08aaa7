"""Codec benchmark: frame sizes and encode/decode cost; run ``python -m benchmarks.codec``."""
