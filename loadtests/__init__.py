"""Benchmarks of softvq-serve: `python -m loadtests.bench --preset cpu|gpu [--quick] --out DIR`."""
