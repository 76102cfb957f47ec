"""Python client of zutis-service: ``Client(url, api_key).segment(image, concepts) -> SegmentResult``.

Needs httpx, numpy and pillow (no torch). ``AsyncClient`` is the asyncio twin; every failure is a ``ZutisError``;
``zutis-client`` is the command line (``zutis_client.cli``).
"""

from zutis_client.client import DEFAULT_URL, AsyncClient, Client
from zutis_client.errors import ZutisError, ZutisUsageError
from zutis_client.result import Instance, SegmentResult
from zutis_client.retry import RetryPolicy
from zutis_client.rle import decode_rle

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Client", "DEFAULT_URL", "Instance", "RetryPolicy", "SegmentResult", "ZutisError",
           "ZutisUsageError", "decode_rle"]
