"""Reading, checking and preparing Perturb-seq AnnData in GEARS's layout.

GEARS (snap-stanford/GEARS, package cell-gears) stores a processed dataset as
``{folder}/perturb_processed.h5ad`` with

* ``obs['condition']``: ``"ctrl"``, ``"A+ctrl"`` (or ``"ctrl+A"``) for a single and ``"A+B"``
  for a double perturbation,
* ``obs['cell_type']`` and ``obs['condition_name']`` = ``{cell_type}_{condition}_{dose}``
  (dose ``"1+1"`` for every condition containing a ``+``, ``"1"`` for ``ctrl``),
* ``var['gene_name']``,
* ``uns['rank_genes_groups_cov_all']``: per ``condition_name``, every gene ranked by the
  absolute t-test score against the control group,
* ``uns['top_non_dropout_de_20']``, ``uns['non_zeros_gene_idx']``,
  ``uns['non_dropout_gene_idx']`` (and ``uns['top_non_zero_de_20']``).

:func:`validate_gears_adata` checks a file that claims to be in it; :mod:`.prepare` turns any
AnnData with a per-cell perturbation column into that layout and :mod:`.de` computes the DE
entries. Every check raises
:class:`DataFormatError` naming the column, condition or gene at fault and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

from scformer_jax.data.conditions import CONTROL, DataFormatError, parse_condition
from scformer_jax.io import atomic_path

PROCESSED_FILE = "perturb_processed.h5ad"
DE_KEY = "rank_genes_groups_cov_all"
UNS_KEYS = (DE_KEY, "top_non_dropout_de_20", "non_zeros_gene_idx", "non_dropout_gene_idx")
OBS_KEYS = ("condition", "cell_type", "condition_name")
# log1p of normalised counts stays far below this; larger values mean un-logged data.
MAX_LOG_VALUE = 30.0

PREPARE_HINT = (
    "Convert the data with `python -m scformer_jax.data prepare IN.h5ad OUT.h5ad "
    "--perturbation-key COLUMN --control-label LABEL` (or scformer_jax.data.prepare)."
)


# ----------------------------------------------------------------------------- conditions


def condition_dose(condition: str) -> str:
    """GEARS's dose string: ``"1+1"`` for every condition with a ``+`` (singles included)."""
    return "1+1" if len(condition.split("+")) == 2 else "1"


def condition_name(cell_type: str, condition: str) -> str:
    """GEARS's ``condition_name``: ``{cell_type}_{condition}_{dose}``."""
    return f"{cell_type}_{condition}_{condition_dose(condition)}"


# ----------------------------------------------------------------------------- value checks


def _matrix_values(X) -> np.ndarray:
    """The stored values of a dense or sparse matrix (no dense copy of a sparse one)."""
    if sparse.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X).ravel()


def check_finite(X, *, what: str = "adata.X") -> None:
    """Raises :class:`DataFormatError` if `X` holds NaN or inf, naming the first cell."""
    values = _matrix_values(X)
    bad = ~np.isfinite(values)
    if not bad.any():
        return
    if sparse.issparse(X):
        csr = sparse.csr_matrix(X)
        first = int(np.flatnonzero(~np.isfinite(csr.data))[0])
        row = int(np.searchsorted(csr.indptr, first, side="right") - 1)
        col = int(csr.indices[first])
    else:
        row, col = (int(i) for i in np.unravel_index(int(np.flatnonzero(bad)[0]), np.shape(X)))
    raise DataFormatError(
        f"{what} holds {int(bad.sum())} NaN/inf values (first at cell {row}, gene column "
        f"{col}). Remove or impute them before use (e.g. drop the affected cells)."
    )


def looks_like_counts(X) -> bool:
    """True when the stored values are non-negative integers (raw UMI counts).

    Checks an evenly strided sample of at most ~1M stored values, so a Norman-sized matrix
    costs milliseconds; log1p-normalised data are essentially never integral.
    """
    values = _matrix_values(X)
    if values.size > 1_000_000:
        values = values[:: values.size // 1_000_000]
    values = values[values != 0]
    if values.size == 0:
        return False
    return bool(np.all(values >= 0) and np.all(values == np.round(values)))


def check_log_values(X, *, what: str = "adata.X") -> None:
    """Checks that `X` holds log1p-normalised expression, not counts or scaled values.

    Raises:
      DataFormatError: for NaN/inf, negative values (scaled data), integer counts or values
        too large to be log1p of normalised counts.
    """
    check_finite(X, what=what)
    values = _matrix_values(X)
    if values.size == 0:
        return
    low, high = float(values.min()), float(values.max())
    if low < 0:
        raise DataFormatError(
            f"{what} holds negative values (min {low:.3g}); scFormer expects log1p-normalised "
            "expression (>= 0), not scaled or centred data. Use the log1p-normalised matrix "
            "(often adata.raw or a 'log1p' layer)."
        )
    if looks_like_counts(X):
        raise DataFormatError(
            f"{what} holds raw counts (all values are integers, max {high:g}) where "
            f"log1p-normalised expression is expected. {PREPARE_HINT} It normalises and "
            "log-transforms counts."
        )
    if high > MAX_LOG_VALUE:
        raise DataFormatError(
            f"{what} has values up to {high:.4g}, too large for log1p-normalised expression "
            f"(expected < {MAX_LOG_VALUE:g}); the data look normalised but not log-transformed. "
            "Apply scanpy.pp.log1p, or run `prepare` with --normalize yes on the raw counts."
        )


# ----------------------------------------------------------------------------- reading


def resolve_h5ad_path(path: str | os.PathLike) -> Path:
    """A GEARS data folder (holding ``perturb_processed.h5ad``) or an ``.h5ad`` file -> file."""
    path = Path(path)
    if path.is_dir():
        inner = path / PROCESSED_FILE
        if not inner.is_file():
            found = sorted(p.name for p in path.glob("*.h5ad"))
            raise DataFormatError(
                f"Folder {str(path)!r} has no {PROCESSED_FILE} (a GEARS data folder holds one)"
                + (f"; it has {found}: pass one of them as the path." if found else ".")
            )
        return inner
    if path.is_file():
        return path
    raise DataFormatError(f"No file or folder at {str(path)!r}.")


def read_gears(path: str | os.PathLike, *, backed: bool = False) -> anndata.AnnData:
    """Reads a GEARS data folder or ``.h5ad`` file (unchecked; see :func:`validate_gears_adata`).

    Args:
      path: a folder holding ``perturb_processed.h5ad``, or an ``.h5ad`` file.
      backed: open read-only without loading X (enough for obs-only work such as splits).
    """
    file = resolve_h5ad_path(path)
    try:
        return anndata.read_h5ad(file, backed="r" if backed else None)
    except Exception as e:  # h5py raises a variety of OSError/KeyError on a bad file
        raise DataFormatError(f"Could not read {str(file)!r} as an .h5ad file: {e}") from e


def check_unique_var_names(
    adata: anndata.AnnData, *, where: str = "adata.var_names", fix: str | None = None
) -> None:
    """Raises :class:`DataFormatError` listing duplicated var names (genes are looked up by
    name, so two columns may not share one) and how to make them unique."""
    names = pd.Index(adata.var_names.astype(str))
    if names.is_unique:
        return
    counts = names.value_counts()
    duplicated = counts[counts > 1]
    listed = ", ".join(f"{name!r} ({n}x)" for name, n in duplicated.head(10).items())
    unique_columns = [
        str(c)
        for c in adata.var.columns
        if not adata.var[c].isna().any() and adata.var[c].astype(str).is_unique
    ]
    column_hint = (
        f"; or index the genes by a column with unique values (here: "
        f"{unique_columns[:5]}), e.g. adata.var_names = "
        f"adata.var[{unique_columns[0]!r}].astype(str)"
        if unique_columns
        else ""
    )
    raise DataFormatError(
        f"{where} has {len(duplicated)} duplicated gene name(s): {listed}"
        f"{' ...' if len(duplicated) > 10 else ''}. Each gene must have its own name: call "
        f"adata.var_names_make_unique() (it appends -1, -2, ... to repeats){column_hint}"
        f"{'. ' + fix if fix else ''}."
    )


# Labels such as "3", "-1" or "3.0": codes of a categorical column, not gene symbols.
def check_columns(frame: pd.DataFrame, keys: Iterable[str], where: str, fix: str) -> None:
    missing = [k for k in keys if k not in frame.columns]
    if missing:
        raise DataFormatError(
            f"{where} has no column(s) {missing} (it has {list(frame.columns)}). {fix}"
        )


def validate_gears_adata(
    adata: anndata.AnnData,
    *,
    require_de: bool = True,
    min_cells: int = 2,
    check_values: bool = True,
) -> None:
    """Checks that an AnnData is a usable GEARS-format Perturb-seq dataset.

    Args:
      adata: the dataset.
      require_de: also require the DE entries of ``uns`` (evaluation needs them).
      min_cells: the fewest cells a condition may have.
      check_values: check X for NaN/inf, counts and un-logged values.

    Raises:
      DataFormatError: naming the missing column or key, the malformed condition, the
        conditions with too few cells, the absent controls or the bad values.
    """
    check_columns(
        adata.obs,
        OBS_KEYS,
        "adata.obs",
        "GEARS-format data need obs['condition'], obs['cell_type'] and "
        f"obs['condition_name']. {PREPARE_HINT}",
    )
    check_columns(
        adata.var,
        ("gene_name",),
        "adata.var",
        "Set adata.var['gene_name'] to the gene symbols (e.g. "
        "adata.var['gene_name'] = adata.var_names).",
    )
    check_unique_var_names(adata, fix="Then write the file again")
    conditions = adata.obs["condition"].astype(str)
    counts = conditions.value_counts()
    for cond in counts.index:
        parse_condition(cond)
    if CONTROL not in counts.index:
        raise DataFormatError(
            "No control cells: obs['condition'] has no 'ctrl' entries. Perturbed cells are "
            "paired with control cells, so the data must include them (label them 'ctrl')."
        )
    small = counts[counts < min_cells]
    if len(small):
        listed = ", ".join(
            f"{c!r} ({n} cell{'s' if n != 1 else ''})" for c, n in small.head(10).items()
        )
        raise DataFormatError(
            f"{len(small)} condition(s) have fewer than {min_cells} cells: {listed}"
            f"{' ...' if len(small) > 10 else ''}. DE genes and means need at least "
            f"{min_cells}; remove these cells or pass drop_small_conditions=True."
        )
    if require_de:
        missing = [k for k in UNS_KEYS if k not in adata.uns]
        if missing:
            raise DataFormatError(
                f"adata.uns has no {missing}: the DE genes GEARS computes for evaluation. "
                + PREPARE_HINT
            )
    if check_values:
        check_log_values(adata.X)


# ----------------------------------------------------------------------------- writing


def write_h5ad_atomic(adata: anndata.AnnData, path: str | os.PathLike) -> Path:
    """Writes `adata` to `path` through a temporary file in the same folder, then renames.

    A failure leaves no partial file behind.
    """
    with atomic_path(path, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return Path(path)
