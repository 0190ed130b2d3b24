"""Importers: turn models from other frameworks into traceable JAX functions."""
