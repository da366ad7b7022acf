"""relook train package."""
