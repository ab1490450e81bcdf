"""Benchmarks for DSKI Node: synthetic medical data sets (``benchmarks.medsynth``) and the
``python -m benchmarks.generate`` command that writes them."""
