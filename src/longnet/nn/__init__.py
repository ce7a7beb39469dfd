"""longnet.nn."""
