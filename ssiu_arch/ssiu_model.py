"""SSIUModel (placeholder until the model issue lands)."""
