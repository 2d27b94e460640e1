"""The ``framepack-rt`` command: ``cli`` (the entry point; info, serve, bench) and ``generate``."""
