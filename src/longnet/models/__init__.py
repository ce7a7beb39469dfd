"""longnet.models."""
