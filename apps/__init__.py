"""relook apps package."""
