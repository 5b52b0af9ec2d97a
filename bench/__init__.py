"""Benchmarks, run by hand: `.venv/bin/python bench/<name>.py --help`."""
