"""flanneld in Python: an overlay-network daemon compatible with Go flanneld."""

__version__ = "0.1.0"
