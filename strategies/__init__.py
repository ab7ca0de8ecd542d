"""Aggregation strategies (Flower's, by name) and the recording wrapper."""
