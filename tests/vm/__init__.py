"""Tests that run inside the test VM (a package: its conftest is not the host tests' one)."""
