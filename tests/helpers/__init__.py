"""Helpers shared by tests: fake secrets generated at run time, test namespaces, cleanup."""
