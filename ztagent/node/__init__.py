"""The node agent: wiring the model, identity, proxy and telemetry into one process."""
