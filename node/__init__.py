"""node package (see docs/ARCHITECTURE.md)."""
