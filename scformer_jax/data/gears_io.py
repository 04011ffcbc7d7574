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

:func:`prepare` turns any AnnData with a per-cell perturbation column into that layout;
:func:`validate_gears_adata` checks a file that claims to be in it. Every check raises
:class:`DataFormatError` naming the column, condition or gene at fault and the fix.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

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
# scanpy's t-test, as GEARS calls it (the default method of rank_genes_groups at the time);
# pinned so a change of scanpy's default cannot change which genes count as DE.
DE_METHOD = "t-test"
# log1p of normalised counts stays far below this; larger values mean un-logged data.
MAX_LOG_VALUE = 30.0

_PREPARE_HINT = (
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
        row, col = (int(i) for i in np.unravel_index(int(np.flatnonzero(bad)[0]),
                                                     np.shape(X)))
    raise DataFormatError(
        f"{what} holds {int(bad.sum())} NaN/inf values (first at cell {row}, gene column "
        f"{col}). Remove or impute them before use (e.g. drop the affected cells).")


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
            "(often adata.raw or a 'log1p' layer).")
    if looks_like_counts(X):
        raise DataFormatError(
            f"{what} holds raw counts (all values are integers, max {high:g}) where "
            f"log1p-normalised expression is expected. {_PREPARE_HINT} It normalises and "
            "log-transforms counts.")
    if high > MAX_LOG_VALUE:
        raise DataFormatError(
            f"{what} has values up to {high:.4g}, too large for log1p-normalised expression "
            f"(expected < {MAX_LOG_VALUE:g}); the data look normalised but not log-transformed. "
            "Apply scanpy.pp.log1p, or run `prepare` with --normalize yes on the raw counts.")


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
                + (f"; it has {found}: pass one of them as the path." if found else "."))
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


def check_unique_var_names(adata: anndata.AnnData, *, where: str = "adata.var_names",
                           fix: str | None = None) -> None:
    """Raises :class:`DataFormatError` listing duplicated var names (genes are looked up by
    name, so two columns may not share one) and how to make them unique."""
    names = pd.Index(adata.var_names.astype(str))
    if names.is_unique:
        return
    counts = names.value_counts()
    duplicated = counts[counts > 1]
    listed = ", ".join(f"{name!r} ({n}x)" for name, n in duplicated.head(10).items())
    unique_columns = [str(c) for c in adata.var.columns
                      if not adata.var[c].isna().any() and adata.var[c].astype(str).is_unique]
    column_hint = (f"; or index the genes by a column with unique values (here: "
                   f"{unique_columns[:5]}), e.g. adata.var_names = "
                   f"adata.var[{unique_columns[0]!r}].astype(str)" if unique_columns else "")
    raise DataFormatError(
        f"{where} has {len(duplicated)} duplicated gene name(s): {listed}"
        f"{' ...' if len(duplicated) > 10 else ''}. Each gene must have its own name: call "
        f"adata.var_names_make_unique() (it appends -1, -2, ... to repeats){column_hint}"
        f"{'. ' + fix if fix else ''}.")


# Labels such as "3", "-1" or "3.0": codes of a categorical column, not gene symbols.
_CODE_LABEL = re.compile(r"[+-]?\d+(\.0+)?")


def _check_labels_are_genes(perturbed: Sequence[str], gene_names: Sequence[str],
                            perturbation_key: str) -> None:
    """Refuses perturbation labels that look like integer codes or name no measured gene."""
    if not perturbed:
        return
    measured = set(gene_names)
    if all(_CODE_LABEL.fullmatch(g) for g in perturbed):
        why = "they look like integer codes"
    elif not measured.intersection(perturbed):
        why = f"none of the {len(perturbed)} perturbed genes is a measured gene"
    else:
        return
    raise DataFormatError(
        f"The perturbation labels in obs[{perturbation_key!r}] do not look like gene names: "
        f"{why} (perturbed: {list(perturbed)[:8]}; measured genes: {list(gene_names)[:5]}). "
        f"If they are codes, map them to gene symbols first, e.g. adata.obs["
        f"{perturbation_key!r}] = adata.obs[{perturbation_key!r}].map(code_to_gene); if they "
        "are the symbols of perturbed genes that were not measured, pass "
        "--labels-are-gene-names (labels_are_gene_names=True).")


def _check_columns(frame: pd.DataFrame, keys: Iterable[str], where: str, fix: str) -> None:
    missing = [k for k in keys if k not in frame.columns]
    if missing:
        raise DataFormatError(
            f"{where} has no column(s) {missing} (it has {list(frame.columns)}). {fix}")


def validate_gears_adata(adata: anndata.AnnData, *, require_de: bool = True,
                         min_cells: int = 2, check_values: bool = True) -> None:
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
    _check_columns(adata.obs, OBS_KEYS, "adata.obs",
                   "GEARS-format data need obs['condition'], obs['cell_type'] and "
                   f"obs['condition_name']. {_PREPARE_HINT}")
    _check_columns(adata.var, ("gene_name",), "adata.var",
                   "Set adata.var['gene_name'] to the gene symbols (e.g. "
                   "adata.var['gene_name'] = adata.var_names).")
    check_unique_var_names(adata, fix="Then write the file again")
    conditions = adata.obs["condition"].astype(str)
    counts = conditions.value_counts()
    for cond in counts.index:
        parse_condition(cond)
    if CONTROL not in counts.index:
        raise DataFormatError(
            "No control cells: obs['condition'] has no 'ctrl' entries. Perturbed cells are "
            "paired with control cells, so the data must include them (label them 'ctrl').")
    small = counts[counts < min_cells]
    if len(small):
        listed = ", ".join(f"{c!r} ({n} cell{'s' if n != 1 else ''})"
                           for c, n in small.head(10).items())
        raise DataFormatError(
            f"{len(small)} condition(s) have fewer than {min_cells} cells: {listed}"
            f"{' ...' if len(small) > 10 else ''}. DE genes and means need at least "
            f"{min_cells}; remove these cells or pass drop_small_conditions=True.")
    if require_de:
        missing = [k for k in UNS_KEYS if k not in adata.uns]
        if missing:
            raise DataFormatError(
                f"adata.uns has no {missing}: the DE genes GEARS computes for evaluation. "
                + _PREPARE_HINT)
    if check_values:
        check_log_values(adata.X)


# ----------------------------------------------------------------------------- DE genes


def group_stats(X, codes: np.ndarray, n_groups: int, *, chunk_rows: int = 8192
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell counts, means and unbiased variances of the rows of X per group.

    One pass over the stored values (bincount per chunk of rows), float64 throughout; no
    dense copy of a sparse X.

    Args:
      X: (cells, genes) CSR matrix or dense array.
      codes: int (cells,): group of each cell, in [0, n_groups).
      n_groups: number of groups.

    Returns:
      counts (n_groups,), means (n_groups, genes), variances (n_groups, genes) with ddof=1
      (0 for groups of one cell, NaN-free).
    """
    X = sparse.csr_matrix(X)
    n_cells, n_genes = X.shape
    codes = np.asarray(codes, np.int64)
    sums = np.zeros(n_groups * n_genes)
    squares = np.zeros(n_groups * n_genes)
    for start in range(0, n_cells, chunk_rows):
        stop = min(start + chunk_rows, n_cells)
        lo, hi = X.indptr[start], X.indptr[stop]
        rows = np.repeat(codes[start:stop], np.diff(X.indptr[start:stop + 1]))
        keys = rows * n_genes + X.indices[lo:hi]
        values = X.data[lo:hi].astype(np.float64)
        sums += np.bincount(keys, weights=values, minlength=n_groups * n_genes)
        squares += np.bincount(keys, weights=values * values, minlength=n_groups * n_genes)
    counts = np.bincount(codes, minlength=n_groups).astype(np.float64)
    safe = np.maximum(counts, 1.0)[:, None]
    means = sums.reshape(n_groups, n_genes) / safe
    variances = squares.reshape(n_groups, n_genes) / safe - means ** 2
    variances = np.maximum(variances, 0.0) * (safe / np.maximum(safe - 1.0, 1.0))
    return counts, means, variances


def _rank_by_abs_score(scores: np.ndarray) -> np.ndarray:
    """Gene order by |score|, descending, breaking ties the way scanpy's top-n selection does."""
    magnitude = np.abs(scores)
    n = magnitude.shape[0]
    partition = np.argpartition(magnitude, -n)[-n:]
    return partition[np.argsort(magnitude[partition])[::-1]]


def _rank_numpy(X, group_names: np.ndarray, reference: str) -> dict[str, np.ndarray]:
    """Welch t-test of every group against `reference`, as scanpy's 't-test' computes it.

    Returns:
      group -> int (genes,) column indices ranked by |t|, NaN scores counting as 0.
    """
    unique, codes = np.unique(group_names, return_inverse=True)
    counts, means, variances = group_stats(X, codes, len(unique))
    ref = int(np.flatnonzero(unique == reference)[0])
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for g, name in enumerate(unique):
            if g == ref:
                continue
            scores = (means[g] - means[ref]) / np.sqrt(
                variances[g] / counts[g] + variances[ref] / counts[ref])
            scores[np.isnan(scores)] = 0.0
            out[str(name)] = _rank_by_abs_score(scores)
    return out


def _rank_scanpy(X, group_names: np.ndarray, reference: str,
                 var_names: pd.Index) -> dict[str, np.ndarray]:
    import scanpy as sc

    sub = anndata.AnnData(
        X=X, obs=pd.DataFrame({"condition_name": pd.Categorical(group_names)},
                              index=pd.RangeIndex(len(group_names)).astype(str)),
        var=pd.DataFrame(index=var_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(sub, groupby="condition_name", reference=reference,
                                method=DE_METHOD, rankby_abs=True, n_genes=sub.n_vars,
                                use_raw=False, corr_method="benjamini-hochberg")
    names = sub.uns["rank_genes_groups"]["names"]
    return {group: var_names.get_indexer(np.asarray(names[group]).astype(str))
            for group in names.dtype.names}


DE_BACKENDS = ("scanpy", "numpy")


def rank_genes_vs_control(adata: anndata.AnnData, *, backend: str = "scanpy"
                          ) -> dict[str, np.ndarray]:
    """Every gene ranked per ``condition_name`` against the cell type's control group.

    GEARS's ranking: within each cell type, group by ``condition_name``, reference
    ``{cell_type}_ctrl_1``, Welch t-test (scanpy's ``method='t-test'``), genes ranked by
    the absolute score, all genes kept.

    Args:
      adata: with obs 'cell_type', 'condition_name' and log1p-normalised X.
      backend: ``"scanpy"`` calls ``scanpy.tl.rank_genes_groups`` as GEARS does;
        ``"numpy"`` computes the same statistic in one vectorised pass (used by the
        simulator, where scanpy takes most of the time at Norman size).

    Returns:
      condition_name -> array of var names (n_genes,), most differential first.
    """
    if backend not in DE_BACKENDS:
        raise ValueError(f"DE backend {backend!r} is not one of {list(DE_BACKENDS)}.")
    result: dict[str, np.ndarray] = {}
    var_names = pd.Index(adata.var_names.astype(str))
    cell_types = adata.obs["cell_type"].astype(str).to_numpy()
    group_names = adata.obs["condition_name"].astype(str).to_numpy()
    X = sparse.csr_matrix(adata.X)
    for cell_type in pd.unique(cell_types):
        mask = cell_types == cell_type
        reference = condition_name(cell_type, CONTROL)
        groups = group_names[mask] if not mask.all() else group_names
        if reference not in set(groups):
            raise DataFormatError(
                f"Cell type {cell_type!r} has no control cells (no condition_name "
                f"{reference!r}); DE genes are computed against each cell type's controls.")
        if len(set(groups)) < 2:
            continue
        sub_X = X[mask] if not mask.all() else X
        if backend == "scanpy":
            ranked = _rank_scanpy(sub_X, groups, reference, var_names)
        else:
            ranked = _rank_numpy(sub_X, groups, reference)
        for group, order in ranked.items():
            result[group] = var_names[order].to_numpy(dtype=str)
    return result


def dropout_gene_sets(adata: anndata.AnnData, ranked: dict[str, np.ndarray]) -> dict[str, dict]:
    """GEARS's non-zero / non-dropout gene sets and their top-20 DE genes.

    For condition p with mean profile m_p and the control mean m_c: non-zero genes have
    m_p != 0; non-dropout genes have m_p != 0 or m_c == 0 (a gene off in p but on in
    control is a drop-out). The top-20 lists take the DE ranking restricted to those sets.

    Args:
      adata: dataset with obs 'condition' and 'condition_name'.
      ranked: :func:`rank_genes_vs_control`'s result.

    Returns:
      ``{"top_non_dropout_de_20", "non_dropout_gene_idx", "non_zeros_gene_idx",
      "top_non_zero_de_20"}``, each keyed by condition_name.
    """
    conditions = adata.obs["condition"].astype(str).to_numpy()
    unique, codes = np.unique(conditions, return_inverse=True)
    _, means, _ = group_stats(adata.X, codes, len(unique))
    ctrl_mean = means[int(np.flatnonzero(unique == CONTROL)[0])]
    name_to_condition = dict(zip(adata.obs["condition_name"].astype(str).to_numpy(),
                                 conditions))
    row_of = {c: i for i, c in enumerate(unique)}
    var_names = pd.Index(adata.var_names.astype(str))
    out = {"top_non_dropout_de_20": {}, "non_dropout_gene_idx": {}, "non_zeros_gene_idx": {},
           "top_non_zero_de_20": {}}
    for name, genes in ranked.items():
        mean = means[row_of[name_to_condition[name]]]
        non_zero = mean != 0
        non_dropout = non_zero | (ctrl_mean == 0)
        order = var_names.get_indexer(genes)
        out["non_zeros_gene_idx"][name] = np.flatnonzero(non_zero)
        out["non_dropout_gene_idx"][name] = np.flatnonzero(non_dropout)
        out["top_non_dropout_de_20"][name] = var_names[order[non_dropout[order]][:20]].to_numpy(
            dtype=str)
        out["top_non_zero_de_20"][name] = var_names[order[non_zero[order]][:20]].to_numpy(
            dtype=str)
    return out


def add_gears_annotations(adata: anndata.AnnData, *, de_backend: str = "scanpy"
                          ) -> anndata.AnnData:
    """Adds GEARS's derived obs columns and DE entries in place (and returns `adata`).

    Needs obs 'condition' and 'cell_type' and log1p-normalised X. Adds obs 'dose_val',
    'control', 'condition_name' and uns 'rank_genes_groups_cov_all', 'top_non_dropout_de_20',
    'non_zeros_gene_idx', 'non_dropout_gene_idx', 'top_non_zero_de_20'.

    Args:
      adata: the dataset, modified in place.
      de_backend: see :func:`rank_genes_vs_control`.
    """
    conditions = adata.obs["condition"].astype(str)
    cell_types = adata.obs["cell_type"].astype(str)
    adata.obs["dose_val"] = pd.Categorical(conditions.map(condition_dose))
    adata.obs["control"] = (conditions == CONTROL).astype(np.int64).to_numpy()
    adata.obs["condition_name"] = pd.Categorical(
        [condition_name(t, c) for t, c in zip(cell_types, conditions)])
    adata.obs["condition"] = pd.Categorical(conditions.to_numpy())
    adata.obs["cell_type"] = pd.Categorical(cell_types.to_numpy())
    ranked = rank_genes_vs_control(adata, backend=de_backend)
    adata.uns[DE_KEY] = ranked
    adata.uns.update(dropout_gene_sets(adata, ranked))
    return adata


# ----------------------------------------------------------------------------- prepare


def _user_label_to_condition(label: str, control_label: str, separator: str) -> str:
    """One user perturbation label -> GEARS condition string (raises on malformed labels)."""
    if label == control_label:
        return CONTROL
    genes = [g for g in label.split(separator) if g != CONTROL]
    if separator != "+" and "+" in label:
        genes = [g for part in genes for g in part.split("+") if g != CONTROL]
    if not genes or any(g.strip() == "" for g in genes) or len(genes) > 2:
        raise DataFormatError(
            f"Malformed perturbation label {label!r}: expected the control label "
            f"{control_label!r}, one gene, or two genes joined by {separator!r}.")
    condition = f"{genes[0]}+{CONTROL}" if len(genes) == 1 else f"{genes[0]}+{genes[1]}"
    try:
        parse_condition(condition)
    except DataFormatError as e:
        raise DataFormatError(f"Perturbation label {label!r}: {e}") from None
    return condition


def prepare(adata: anndata.AnnData, *, perturbation_key: str, control_label: str,
            cell_type_key: str | None = None, cell_type: str = "cell",
            gene_name_key: str | None = None, combo_separator: str = "+",
            normalize: bool | None = None, target_sum: float = 1e4,
            min_cells: int = 2, de_backend: str = "scanpy",
            labels_are_gene_names: bool = False) -> anndata.AnnData:
    """A user's Perturb-seq AnnData -> a new AnnData in GEARS's processed layout.

    Args:
      adata: cells x genes; X raw counts or log1p-normalised expression, dense or sparse.
      perturbation_key: obs column with each cell's perturbation: `control_label`, a gene
        name, or two gene names joined by `combo_separator` (GEARS strings such as
        ``"A+ctrl"`` are accepted too).
      control_label: the value of `perturbation_key` that marks control cells.
      cell_type_key: obs column with the cell type; None: every cell is `cell_type`.
      cell_type: the cell type when `cell_type_key` is None.
      gene_name_key: var column with gene symbols; None: the var names.
      combo_separator: joins the two genes of a double perturbation in the user's labels.
      normalize: True: X holds counts, normalise to `target_sum` per cell and log1p; False:
        X is already log1p-normalised; None: decide from X (integers mean counts).
      target_sum: total per cell after normalisation.
      min_cells: the fewest cells a condition may have (the t-test needs 2).
      de_backend: ``"scanpy"`` (GEARS's own call, the default) or ``"numpy"`` (same
        statistic, faster); see :func:`rank_genes_vs_control`.
      labels_are_gene_names: accept labels that look like integer codes or name no
        measured gene (refused by default: such a column usually holds category codes).

    Returns:
      A new AnnData (CSR float32 X, obs with 'condition', 'cell_type', 'condition_name',
      'dose_val', 'control' and the input's columns, var with 'gene_name', uns with GEARS's
      DE entries). The input is not modified.

    Raises:
      DataFormatError: missing columns, duplicated var names, missing labels, malformed
        labels, labels that are not gene names, no control cells, conditions with fewer than
        `min_cells` cells, NaN/inf, counts declared as log values.
    """
    import scanpy as sc

    _check_columns(adata.obs, [perturbation_key], "adata.obs",
                   "Pass the obs column that holds each cell's perturbed gene(s) as "
                   "--perturbation-key / perturbation_key.")
    if cell_type_key is not None:
        _check_columns(adata.obs, [cell_type_key], "adata.obs",
                       "Pass an existing column as --cell-type-key, or leave it out to use one "
                       "cell type for all cells (--cell-type NAME).")
    if gene_name_key is not None:
        _check_columns(adata.var, [gene_name_key], "adata.var",
                       "Pass the var column holding gene symbols as --gene-name-key, or leave it "
                       "out to use the var names.")
    check_unique_var_names(adata)
    labels = adata.obs[perturbation_key]
    if labels.isna().any():
        first = adata.obs_names[labels.isna().to_numpy()][0]
        raise DataFormatError(
            f"obs[{perturbation_key!r}] is missing for {int(labels.isna().sum())} cells (first: "
            f"{first!r}). Label every cell (controls with {control_label!r}) or drop them.")
    labels = labels.astype(str).to_numpy()
    if not np.any(labels == control_label):
        examples = list(pd.unique(labels)[:8])
        raise DataFormatError(
            f"No control cells: no cell has obs[{perturbation_key!r}] == {control_label!r} "
            f"(values include {examples}). Pass the label your data use for control cells as "
            "--control-label.")
    unique_labels = pd.unique(labels)
    mapping = {label: _user_label_to_condition(label, control_label, combo_separator)
               for label in unique_labels}
    conditions = pd.Series(labels).map(mapping).to_numpy()
    gene_names = (adata.var[gene_name_key].astype(str).to_numpy() if gene_name_key is not None
                  else adata.var_names.astype(str).to_numpy())
    if not labels_are_gene_names:
        _check_labels_are_genes(
            sorted({g for c in mapping.values() for g in parse_condition(c)}), gene_names,
            perturbation_key)
    counts = pd.Series(conditions).value_counts()
    small = counts[counts < min_cells]
    if len(small):
        listed = ", ".join(f"{c!r} ({n})" for c, n in small.head(10).items())
        raise DataFormatError(
            f"{len(small)} condition(s) have fewer than {min_cells} cells: {listed}"
            f"{' ...' if len(small) > 10 else ''}. The t-test behind the DE genes needs at "
            f"least {min_cells} cells per condition; remove those cells first, e.g. "
            f"adata = adata[adata.obs[{perturbation_key!r}].map(adata.obs[{perturbation_key!r}]"
            f".value_counts()) >= {min_cells}].")

    X = adata.X
    if X is None:
        raise DataFormatError("adata.X is empty; put the expression matrix in X.")
    check_finite(X)
    # A copy: normalisation below works in place and the input must stay as it was.
    X = sparse.csr_matrix(X, dtype=np.float32, copy=True)
    is_counts = looks_like_counts(X)
    if normalize is None:
        normalize = is_counts
    elif normalize is False and is_counts:
        raise DataFormatError(
            "adata.X holds raw counts (all values are integers) but normalize=False says it is "
            "log1p-normalised. Use --normalize auto/yes to normalise and log-transform it.")
    if normalize and not is_counts:
        warnings.warn("normalize=True on a matrix that is not integer counts; normalising and "
                      "log-transforming it anyway.", stacklevel=2)

    if cell_type_key is not None:
        if adata.obs[cell_type_key].isna().any():
            raise DataFormatError(
                f"obs[{cell_type_key!r}] is missing for "
                f"{int(adata.obs[cell_type_key].isna().sum())} cells; fill it or drop them.")
        cell_types = adata.obs[cell_type_key].astype(str).to_numpy()
    else:
        cell_types = np.full(adata.n_obs, str(cell_type), dtype=object)
    for t in pd.unique(cell_types):
        if "_" in t:
            warnings.warn(f"Cell type {t!r} contains '_', which GEARS also uses to join "
                          "condition_name; names stay unambiguous here.", stacklevel=2)

    obs = adata.obs.copy()
    obs["condition"] = conditions
    obs["cell_type"] = cell_types
    var = pd.DataFrame(index=pd.Index(adata.var_names.astype(str)))
    for column in adata.var.columns:
        var[column] = adata.var[column].to_numpy()
    var["gene_name"] = gene_names
    out = anndata.AnnData(X=X, obs=obs, var=var)
    if normalize:
        sc.pp.normalize_total(out, target_sum=target_sum)
        sc.pp.log1p(out)
        out.X = sparse.csr_matrix(out.X, dtype=np.float32)
    check_log_values(out.X)

    measured = set(gene_names)
    unmeasured = sorted({g for c in pd.unique(conditions) for g in parse_condition(c)}
                        - measured)
    if unmeasured:
        warnings.warn(
            f"{len(unmeasured)} perturbed gene(s) are not among the measured genes: "
            f"{unmeasured[:10]}{' ...' if len(unmeasured) > 10 else ''}. They become extra "
            "input tokens (flag 1, expression 0).", stacklevel=2)
    return add_gears_annotations(out, de_backend=de_backend)


# ----------------------------------------------------------------------------- writing


def write_h5ad_atomic(adata: anndata.AnnData, path: str | os.PathLike) -> Path:
    """Writes `adata` to `path` through a temporary file in the same folder, then renames.

    A failure leaves no partial file behind.
    """
    with atomic_path(path, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


def unique_conditions(conditions: Sequence[str]) -> list[str]:
    """Distinct conditions in order of first appearance (how GEARS lists them)."""
    return [str(c) for c in pd.unique(pd.Series(conditions, dtype=object).astype(str))]
