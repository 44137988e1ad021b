"""Evaluation: QA and needle tasks, F1/EM, fidelity metrics, the benchmark grid and plots."""
