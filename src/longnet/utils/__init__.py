"""Small helpers that every layer of longnet may use (they import nothing from longnet outside
``longnet.utils``)."""
