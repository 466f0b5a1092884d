"""The Dagster layer: wires the engine's operations to assets, checks and schedules. One module
per concern; no backup logic lives here."""
