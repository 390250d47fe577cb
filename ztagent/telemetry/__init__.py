"""What the agent tells the outside: Istio's metrics, the access log and process logging,
and the admin, metrics and readiness HTTP endpoints. Nothing here depends on the model."""
