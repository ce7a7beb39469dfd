"""longnet.train."""
