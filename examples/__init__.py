"""Examples that drive the simulator (run from the repository root)."""
