"""Shared fixtures: the real upstream registry lives in tests/fixtures/real_upstream.py."""

pytest_plugins = ["tests.fixtures.real_upstream"]
