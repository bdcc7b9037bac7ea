"""Fixtures for the engine tests (see conftest.py)."""
