"""rpc package (see docs/ARCHITECTURE.md)."""
