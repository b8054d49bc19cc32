"""Integrations with other libraries (imported on demand: `normkit.integrations.lightning`)."""
