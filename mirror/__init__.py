"""registry-mirror: a pull-through caching mirror for Docker/OCI registries."""

__version__ = "0.1.0"
