#!/usr/bin/env python3
"""Allocates (and touches) memory until the job's --mem limit kills it."""

import sys

print("loading dataset into memory", flush=True)
chunks = []
for i in range(10_000):
    chunks.append(bytearray(b"x" * (8 * 1024 * 1024)))
    if i % 8 == 0:
        print(f"loaded {len(chunks) * 8} MiB", flush=True)
print("should not get here", file=sys.stderr)
