"""The cache: content-addressed blob storage, metadata, and single-flight fills."""
