"""tdist: serve inference pipelines across GPU hosts."""

__version__ = "0.1.0"
