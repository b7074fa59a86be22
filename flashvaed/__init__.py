"""flashvaed: fast, exact streaming video VAE decoders (the Flash-VAED method)."""

__version__ = "0.1.0"
