"""Evaluation on the shapes world: the attribute oracle (oracle.py, reader.py) and metrics.py."""
