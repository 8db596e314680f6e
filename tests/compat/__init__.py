"""Real clients through both pgfleet listeners."""
