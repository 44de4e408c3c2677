"""The package's version, in one place (the CLI's ``--version`` and a saved file's metadata read it)."""

__version__ = "0.1.0"
