"""Imports for the cross-checks against other libraries (GEARS, cell-eval).

Locally a missing library skips its test. CI sets ``SCFORMER_REQUIRE_PARITY=1`` (see
``.ci/run``, which installs the libraries), so there a missing library fails the test
instead of skipping it: the parity checks run on every change.
"""

import importlib
import os

import pytest

REQUIRED = os.environ.get("SCFORMER_REQUIRE_PARITY", "") not in ("", "0")


def require(module: str):
    """The imported module; a skip (locally) or a failure (CI) when it is missing."""
    if not REQUIRED:
        return pytest.importorskip(module)
    try:
        return importlib.import_module(module)
    except ImportError as err:
        pytest.fail(
            f"SCFORMER_REQUIRE_PARITY is set but {module!r} cannot be imported "
            f"({err}); install it as .ci/run does."
        )
