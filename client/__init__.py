"""Clients of the HTTP API. They import nothing from api/, worker/ or JAX: only HTTP.

from client import Client, AsyncClient   # client/api.py
"""

from client.api import ApiError, AsyncClient, Client, Dataset, Event, Image, Job, Unreachable, encode_image

__all__ = ["ApiError", "AsyncClient", "Client", "Dataset", "Event", "Image", "Job", "Unreachable", "encode_image"]
