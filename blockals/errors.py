"""Exceptions raised for bad input and unreadable stores.

Every message is one sentence that names the row, column, parameter or path at fault,
so the command-line interface can print it as it is, without a traceback.
"""

from __future__ import annotations

__all__ = ["BlockalsError", "InputError", "StoreError", "LeaseError"]


class BlockalsError(Exception):
    """Base class of the errors blockals raises on purpose."""


class InputError(BlockalsError, ValueError):
    """The ratings, ids or parameters given by the user cannot be used."""


class StoreError(BlockalsError, OSError):
    """A ratings store, checkpoint or model on disk is missing, incomplete or of an unknown version."""


class LeaseError(StoreError):
    """A path is being written, or a store read, by another run (see :mod:`blockals.lock`)."""
