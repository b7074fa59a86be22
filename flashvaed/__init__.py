"""flashvaed: fast, exact streaming video VAE decoders (the Flash-VAED method)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flashvaed")  # one source of truth: pyproject.toml's, as installed
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
