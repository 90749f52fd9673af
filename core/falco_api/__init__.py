"""falco-api: the Falco API next to an unmodified Falco."""

__version__ = "0.1.0"
