"""Hosted repositories: names the mirror keeps content for itself (pushed to it), beside the
names it mirrors. Their blobs live in the cache's content-addressed store (one copy of a layer
whether pushed or pulled); what is hosted, linked, tagged and referenced is recorded apart
(`metadata.py`), so the cache's eviction never touches it and `gc.py` collects it instead."""
