"""Test-wide set-up: two fake CPU devices, so data-parallel code is exercised everywhere.

The flag must be set before JAX initialises its backend, hence at import of this file.
Fixtures of the data tests carry a ``data_`` prefix.
"""

import os

_flag = "--xla_force_host_platform_device_count=2"
if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
