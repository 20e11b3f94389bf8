"""Prefix routing: canonical routing text, chained block hashes, the bounded prefix index."""
