"""longnet.data."""
