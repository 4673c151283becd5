"""Talking to upstream registries: auth challenges and tokens, requests, routing."""
