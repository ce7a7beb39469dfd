"""longnet.ops."""
