"""Test doubles for what cannot run on a development machine (Falco itself)."""
