"""Fuzz targets for the parsers that read network or configuration input (see `targets.py`)."""
