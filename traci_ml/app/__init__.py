"""The applications, above the services: the CLI, the supervisor behind ``traci up`` and
``traci serve``, prediction and export, the serving client, plots and the data tools."""
