"""Audit: append-only, hash-chained JSON lines; verify; replay."""
