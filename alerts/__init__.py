"""Alert rule jobs (vectorised numpy), air-quality indices and the alert lifecycle."""
