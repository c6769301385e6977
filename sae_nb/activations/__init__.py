"""A model, a corpus and a site become an on-disk activation store (notebook 01)."""
