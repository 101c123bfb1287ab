"""Downstream evaluation protocols: each reads one encoder and returns metrics."""
