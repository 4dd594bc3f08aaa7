"""vendgate: the gateway between payment backends and vending machines."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vendgate")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
