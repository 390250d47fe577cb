"""What Istio's resources mean: pure, no I/O."""
