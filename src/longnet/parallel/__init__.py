"""longnet.parallel."""
