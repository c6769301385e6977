"""Objectives, the trainer, distribution, streaming and evaluation (notebook 02)."""
