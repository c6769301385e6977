"""One latent at a time: statistics, contexts, logit effects, families (notebook 06)."""
