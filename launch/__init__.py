"""Command-line entry points: python -m launch.train / launch.sample / launch.evaluate."""
