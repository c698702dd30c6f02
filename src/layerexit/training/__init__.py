"""Training: the one loop, the methods as data (objectives), resumable checkpoints, data-parallel runs."""
