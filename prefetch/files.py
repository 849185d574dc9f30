"""Kept for code that imports ``prefetch.files`` (and for pickles that name ``prefetch.files.Files``): the module
moved to ``prefetch/readers/files.py`` with the other readers."""

from .readers.files import Files, load_bytes, load_default, load_npz

__all__ = ["Files", "load_bytes", "load_default", "load_npz"]
