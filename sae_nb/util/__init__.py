"""Files, checks and threads: knows nothing of models or dictionaries."""
