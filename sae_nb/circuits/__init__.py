"""Circuits: a transcoder at every layer, the replacement model and attribution graphs."""
