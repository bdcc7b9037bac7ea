"""Fixtures for the rpc tests (see conftest.py)."""
