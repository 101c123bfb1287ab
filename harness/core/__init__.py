"""The bottom layer: config schemas, registry, errors, file io, records, provenance, tracking,
distributed and training utilities, datasets. Imports nothing of the project above it."""
