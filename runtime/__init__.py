"""Process plumbing: configs, trainer processes, cores, checkpoints, run records, the async producer, sweeps."""
