"""consensus package (see docs/ARCHITECTURE.md)."""
