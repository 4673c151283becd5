"""The HTTP layer: parses and validates requests, renders OCI errors, streams responses."""
