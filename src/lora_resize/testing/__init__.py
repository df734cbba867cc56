"""Synthetic architectures and LoRA makers that the tests, the benchmarks and the demo share (no download)."""
