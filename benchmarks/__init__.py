"""vaelab's speed and memory benchmark: `python -m benchmarks` (or `make bench`)."""
