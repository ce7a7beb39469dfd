"""longnet.integrations."""
