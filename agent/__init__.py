"""relook agent package."""
