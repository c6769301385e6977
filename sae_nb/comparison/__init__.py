"""Which dictionary is better, with its noise: the ground-truth lab, recovery, uncertainty,
grids, task metrics (notebook 09)."""
