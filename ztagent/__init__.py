"""ztagent: a sidecarless (ambient) service-mesh node agent."""

__version__ = "0.1.0"
