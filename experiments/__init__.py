"""relook experiments package."""
