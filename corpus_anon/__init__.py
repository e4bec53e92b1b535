"""corpus-anon: anonymize sign-language video corpora (DiffSLVA) on Ray Data.

This module holds the version only and imports nothing heavy: the driver imports it.
"""

__version__ = "0.1.0"
