"""Clients of the HTTP API. They import nothing from api/, worker/ or JAX: only HTTP."""
