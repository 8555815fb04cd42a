"""marginflow.experiments (filled in by its issue)."""
