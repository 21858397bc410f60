"""Tiny real diffusers pipelines built in code for tests, benchmarks and demo training: tiny (random) and plant (planted memorization)."""
