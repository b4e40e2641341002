"""p2p package (see docs/ARCHITECTURE.md)."""
