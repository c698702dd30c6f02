"""Evaluation: offline replay of every strategy, calibration, benchmarks and figures."""
