"""minismtp: a pre-forked SMTP receiver with a sans-IO protocol core."""

__version__ = "0.1.0"
