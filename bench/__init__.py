"""Benchmarks of t2i-slim: `python -m bench run` (all), `python -m bench run NAME...`, `--tiny` for a quick check.

Every figure is a comparison measured side by side in the same run (median of repetitions), with the machine noted;
results land in docs/benchmarks/*.json and `python -m bench report` renders docs/benchmarks.md and the charts.
"""
