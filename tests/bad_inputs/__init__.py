"""Bad inputs for the end-to-end suite, generated on the fly (nothing binary is committed).

`generate` has one function per kind of input; each writes what it needs into a `Dest` (a local
folder or an S3 prefix) and returns the manifest row(s) that point at it. The expected outcome of
every kind is listed in one table, in `tests/e2e/test_bad_inputs.py`.
"""

from tests.bad_inputs.generate import KINDS, Dest, manifest_table

__all__ = ["KINDS", "Dest", "manifest_table"]
