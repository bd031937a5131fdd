"""Integrations with other libraries (imported on demand, so their packages stay optional)."""
