"""The base library, below the services: config, data and alignment, the schedule, tensors,
the broker link, security, checkpoints, the run directory and the model definitions. Nothing
here imports a service or an application (tests/test_layout.py); docs/architecture.md is the map."""
