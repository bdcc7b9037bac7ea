"""Fixtures for the host tests (see conftest.py)."""
