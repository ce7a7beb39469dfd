"""longnet.cli."""
