"""The package version (its own module so that any floor can read it without importing :mod:`seqtool`)."""
__version__ = "0.1.0"
