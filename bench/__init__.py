"""TRACI's benchmark suite (``make bench``): measured against baselines in one invocation."""
