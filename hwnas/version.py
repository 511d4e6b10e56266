"""The installed hwnas version (journals and distributed searches record it: another version's scores or
workers are not mixed in)."""

from importlib import metadata

try:
    __version__ = metadata.version("hwnas")
except metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0+unknown"
