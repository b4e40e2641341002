"""compute package (see docs/ARCHITECTURE.md)."""
