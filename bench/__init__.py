"""Benchmarks of tollway (run them as scripts: ``python bench/engine.py --json``)."""
