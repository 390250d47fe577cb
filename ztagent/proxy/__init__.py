"""Moving application connections: the listeners' protocols and the relay."""
