"""Test-wide set-up: two fake CPU devices, so data-parallel code is exercised everywhere.

The flag must be set before JAX initialises its backend, hence at import of this file.
Fixtures of the data tests carry a ``data_`` prefix.
"""

import os

_flag = "--xla_force_host_platform_device_count=2"
if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# ------------------------------------------------------------------ data fixtures (data_*)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_tiny_adata():
    """The tiny simulated dataset (GEARS-format AnnData, ~300 cells x 40 genes), seed 0.

    Session-scoped: tests must not modify it (copy it first).
    """
    from scformer_jax.data.simulate import simulate

    return simulate("tiny", seed=0)


@pytest.fixture(scope="session")
def data_tiny(data_tiny_adata):
    """:class:`PerturbData` of ``data_tiny_adata`` (read-only)."""
    from scformer_jax.data.dataset import PerturbData

    return PerturbData(data_tiny_adata, name="tiny")


@pytest.fixture(scope="session")
def data_tiny_unmeasured():
    """A tiny simulated :class:`PerturbData` with one perturbed gene that is not measured."""
    import warnings

    from scformer_jax.data.dataset import PerturbData
    from scformer_jax.data.simulate import simulate, simulation_config

    adata = simulate(simulation_config("tiny", n_unmeasured_pert_genes=1), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PerturbData(adata, name="tiny-unmeasured")


@pytest.fixture
def cell_reads(monkeypatch):
    """A Counter, (cell index, ...) -> how many times a mean over those cells was computed
    (``PerturbData.expression_moments`` and ``mean_expression``) while the test runs."""
    import collections

    import numpy as np

    from scformer_jax.data.dataset import PerturbData

    reads = collections.Counter()
    for name in ("expression_moments", "mean_expression"):
        original = getattr(PerturbData, name)

        def counting(self, cells, _original=original):
            reads[tuple(np.asarray(cells).tolist())] += 1
            return _original(self, cells)

        monkeypatch.setattr(PerturbData, name, counting)
    return reads


# ------------------------------------------------------------------ the tiny model
@pytest.fixture(scope="session")
def tiny():
    """(config, params) of the shared tiny model (``tests/tiny_model.py``) with dropout 0.1
    and the plain attention kernel; params from PRNGKey(0). Read-only."""
    import jax

    from scformer_jax.model import init_params
    from tests.tiny_model import tiny_config

    config = tiny_config(dropout=0.1, attention="full")
    return config, init_params(config, jax.random.PRNGKey(0))
