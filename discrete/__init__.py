"""marginflow.discrete (filled in by its issue)."""
