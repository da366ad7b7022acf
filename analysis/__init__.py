"""relook analysis package."""
