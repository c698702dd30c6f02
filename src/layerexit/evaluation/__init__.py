"""Evaluation: offline replay of every strategy, calibration, benchmarks, comparisons and figures."""
