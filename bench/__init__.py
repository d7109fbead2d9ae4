"""Benchmarks: ``python -m bench.run --profile {smoke,cpu,gpu}`` (``make bench``, ``make bench-gpu``)."""
