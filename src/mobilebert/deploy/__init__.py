"""Deployment: export, quantization, inference optimization and benchmarks."""
