"""Run folders, the main job, command-line jobs and sweeps."""
