"""The splice with its error term, edits, effects, attribution and steering (notebook 07)."""
