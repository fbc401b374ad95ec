"""The terminal app: setup, dashboard and samples screens (Textual)."""
