"""JSON schemas that Falco itself validates its files with (data only; see README.md)."""
