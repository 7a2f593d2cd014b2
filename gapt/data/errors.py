"""The one error type of the data layer."""
from __future__ import annotations


class DataError(ValueError):
    """Data that cannot be used, found before training starts.

    The message always names the offending file (and the line, for list and CSV files)
    or, for a bad config value, the key and the valid choices.
    """
