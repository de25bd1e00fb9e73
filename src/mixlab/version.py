"""mixlab's version (a leaf module: lower layers read it without importing the package)."""
__version__ = "0.1.0"
