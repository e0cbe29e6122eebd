"""Integrations of slattn with training and inference frameworks: the SDPA patch and its config."""
