"""blockals: alternating least squares recommenders, out-of-core on Dask."""

from __future__ import annotations

from blockals.errors import BlockalsError, InputError, StoreError
from blockals.ingest import ingest
from blockals.model import ALS
from blockals.search import SearchResult, search
from blockals import datasets, evaluation
from blockals.store import RatingStore, open_store

__all__ = ["ALS", "ingest", "open_store", "RatingStore", "search", "SearchResult", "BlockalsError", "InputError", "StoreError"]
__version__ = "0.1.0"
