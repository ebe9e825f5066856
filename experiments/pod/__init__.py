"""Pod-scale experiment configs (``--config=experiments/pod/<name>.py:slice=...``) and their slices."""
