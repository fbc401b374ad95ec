"""Helpers shared by every test directory (on pytest's `pythonpath`: `from support import ...`)."""
