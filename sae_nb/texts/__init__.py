"""Whole texts in latent space: pooled codes, probes, clusters, bags of codes (notebooks 03-05)."""
