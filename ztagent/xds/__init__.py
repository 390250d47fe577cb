"""Istio control-plane wire types: workload xDS (delta ADS), L4 authorization, the CA API.

The .proto sources are in ``proto/``; the Python modules in ``gen/`` are generated from them
(``scripts/gen-protos.sh``).
"""
