"""Differential expression as GEARS computes it: per-group statistics, genes ranked against
each cell type's controls, and the non-zero / non-dropout gene sets of GEARS's layout.

:func:`add_gears_annotations` writes all of it into an AnnData (``uns`` keys of
:data:`~scformer_jax.data.gears_io.UNS_KEYS`).
"""

from __future__ import annotations

import warnings

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

from scformer_jax.data.conditions import CONTROL, DataFormatError
from scformer_jax.data.gears_io import DE_KEY, condition_dose, condition_name

# scanpy's t-test, as GEARS calls it (the default method of rank_genes_groups at the time);
# pinned so a change of scanpy's default cannot change which genes count as DE.
DE_METHOD = "t-test"


def row_chunks(X, chunk_rows: int = 8192):
    """Yields (start, CSR block of rows [start, start + chunk_rows)) of an in-memory matrix
    or of a :class:`~scformer_jax.data.backed.BackedCSR` on disk (same blocks either way)."""
    if hasattr(X, "row_chunks"):
        yield from X.row_chunks(chunk_rows)
        return
    X = sparse.csr_matrix(X)
    for start in range(0, X.shape[0], chunk_rows):
        stop = min(start + chunk_rows, X.shape[0])
        lo, hi = X.indptr[start], X.indptr[stop]
        indptr = X.indptr[start : stop + 1] - lo
        yield (
            start,
            sparse.csr_matrix(
                (X.data[lo:hi], X.indices[lo:hi], indptr), shape=(stop - start, X.shape[1])
            ),
        )


def group_stats(
    X, codes: np.ndarray, n_groups: int, *, chunk_rows: int = 8192, progress: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell counts, means and unbiased variances of the rows of X per group.

    One pass over the stored values (a sparse product per chunk of rows over the groups in
    the chunk), float64 throughout; no dense copy of a sparse X. A matrix on disk
    (:class:`~scformer_jax.data.backed.BackedCSR`) is read chunk by chunk and gives the same
    numbers as in memory.

    Args:
      X: (cells, genes) CSR matrix, dense array or BackedCSR.
      codes: int (cells,): group of each cell, in [0, n_groups); -1 leaves a cell out.
      n_groups: number of groups.
      chunk_rows: rows per pass.
      progress: a label for a progress bar on stderr; None: none.

    Returns:
      counts (n_groups,), means (n_groups, genes), variances (n_groups, genes) with ddof=1
      (0 for groups of one cell, NaN-free).
    """
    n_cells, n_genes = X.shape
    codes = np.asarray(codes, np.int64)
    sums = np.zeros((n_groups, n_genes))
    squares = np.zeros((n_groups, n_genes))
    chunks = row_chunks(X, chunk_rows)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc=progress, total=-(-n_cells // chunk_rows), unit="chunk")
    # Flat views: adding at (group * n_genes + gene) positions is much faster than a
    # (rows, cols) fancy index; each position is added once per chunk, as before.
    flat_sums, flat_squares = sums.reshape(-1), squares.reshape(-1)
    for start, block in chunks:
        rows = np.flatnonzero(codes[start : start + block.shape[0]] >= 0)
        if not len(rows):
            continue
        present, local = np.unique(codes[start + rows], return_inverse=True)
        # Sum per group as a sparse product (group indicator @ rows), which adds each group's
        # cells in row order: memory and time follow the stored values, not groups x genes.
        indicator = sparse.csr_matrix(
            (np.ones(len(rows)), (local, rows)), shape=(len(present), block.shape[0])
        )
        values = sparse.csr_matrix(
            (block.data.astype(np.float64), block.indices, block.indptr), shape=block.shape
        )
        if not values.has_canonical_format:
            # Squares need one value per position; a copy, so that the caller's arrays
            # (views of X) are never reordered.
            values = values.copy()
            values.sum_duplicates()
        squared = values.copy()
        squared.data *= squared.data
        row_offsets = present.astype(np.int64) * n_genes
        for total, matrix in ((flat_sums, values), (flat_squares, squared)):
            part = indicator @ matrix  # CSR (len(present), genes)
            positions = np.repeat(row_offsets, np.diff(part.indptr)) + part.indices
            total[positions] += part.data
    counts = np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.float64)
    safe = np.maximum(counts, 1.0)[:, None]
    # In place, block by block (the same operations as sums / safe and
    # squares / safe - means**2): no extra groups x genes temporaries.
    means = sums
    means /= safe
    variances = squares
    variances /= safe
    for lo in range(0, n_groups, 1024):
        variances[lo : lo + 1024] -= np.square(means[lo : lo + 1024])
    np.maximum(variances, 0.0, out=variances)
    variances *= safe / np.maximum(safe - 1.0, 1.0)
    return counts, means, variances


def _rank_by_abs_score(scores: np.ndarray) -> np.ndarray:
    """Gene order by |score|, descending, breaking ties the way scanpy's top-n selection does."""
    magnitude = np.abs(scores)
    n = magnitude.shape[0]
    partition = np.argpartition(magnitude, -n)[-n:]
    return partition[np.argsort(magnitude[partition])[::-1]]


def _rank_numpy(
    X, group_names: np.ndarray, reference: str, *, progress: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Welch t-test of every group against `reference`, as scanpy's 't-test' computes it.

    Args:
      X: (cells, genes) matrix in memory or on disk.
      group_names: str (cells,): each cell's group; ``""`` leaves a cell out.

    Returns:
      group -> int (genes,) column indices ranked by |t|, NaN scores counting as 0; and
      group -> float64 (genes,) mean of the group's cells (rows of one array, the reference
      included).
    """
    unique, codes = np.unique(group_names, return_inverse=True)
    codes = np.where(group_names == "", -1, codes)
    counts, means, variances = group_stats(X, codes, len(unique), progress=progress)
    ref = int(np.flatnonzero(unique == reference)[0])
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for g, name in enumerate(unique):
            if g == ref or name == "":
                continue
            scores = (means[g] - means[ref]) / np.sqrt(
                variances[g] / counts[g] + variances[ref] / counts[ref]
            )
            scores[np.isnan(scores)] = 0.0
            out[str(name)] = _rank_by_abs_score(scores)
    del variances
    group_means = {str(name): means[g] for g, name in enumerate(unique) if name != ""}
    return out, group_means


def _rank_scanpy(
    X, group_names: np.ndarray, reference: str, var_names: pd.Index
) -> dict[str, np.ndarray]:
    import scanpy as sc

    sub = anndata.AnnData(
        X=X,
        obs=pd.DataFrame(
            {"condition_name": pd.Categorical(group_names)},
            index=pd.RangeIndex(len(group_names)).astype(str),
        ),
        var=pd.DataFrame(index=var_names),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(
            sub,
            groupby="condition_name",
            reference=reference,
            method=DE_METHOD,
            rankby_abs=True,
            n_genes=sub.n_vars,
            use_raw=False,
            corr_method="benjamini-hochberg",
        )
    names = sub.uns["rank_genes_groups"]["names"]
    return {
        group: var_names.get_indexer(np.asarray(names[group]).astype(str))
        for group in names.dtype.names
    }


DE_BACKENDS = ("scanpy", "numpy")


def rank_genes_vs_control(
    adata: anndata.AnnData, *, backend: str = "scanpy", X=None, progress: bool = False
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
      X: the expression matrix when it is not ``adata.X``: a
        :class:`~scformer_jax.data.backed.BackedCSR` on disk (numpy backend only), read in
        chunks.
      progress: show a progress bar per cell type.

    Returns:
      condition_name -> array of var names (n_genes,), most differential first.
    """
    return _rank_genes(adata, backend=backend, X=X, progress=progress)[0]


def _rank_genes(
    adata: anndata.AnnData, *, backend: str, X, progress: bool
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """:func:`rank_genes_vs_control`, and the per-``condition_name`` means of X when the
    ranking computed them over all cells (numpy backend, one cell type): the same numbers
    :func:`dropout_gene_sets` would compute in another pass (the same cells summed in the
    same order), else None."""
    if backend not in DE_BACKENDS:
        raise ValueError(f"DE backend {backend!r} is not one of {list(DE_BACKENDS)}.")
    result: dict[str, np.ndarray] = {}
    var_names = pd.Index(adata.var_names.astype(str))
    cell_types = adata.obs["cell_type"].astype(str).to_numpy()
    group_names = adata.obs["condition_name"].astype(str).to_numpy()
    on_disk = X is not None and hasattr(X, "row_chunks")
    if on_disk and backend != "numpy":
        raise ValueError(
            "DE genes of a matrix on disk are computed with the numpy backend (the same "
            "statistic as scanpy's t-test); pass de_backend='numpy'."
        )
    X = X if on_disk else sparse.csr_matrix(adata.X if X is None else X)
    means = None
    for cell_type in pd.unique(cell_types):
        mask = cell_types == cell_type
        reference = condition_name(cell_type, CONTROL)
        groups = group_names[mask] if not mask.all() else group_names
        if reference not in set(groups):
            raise DataFormatError(
                f"Cell type {cell_type!r} has no control cells (no condition_name "
                f"{reference!r}); DE genes are computed against each cell type's controls."
            )
        if len(set(groups)) < 2:
            continue
        label = f"DE genes ({cell_type})" if progress else None
        if on_disk:
            # Cells of other types are left out by their empty group name.
            ranked, group_means = _rank_numpy(
                X, np.where(mask, group_names, ""), reference, progress=label
            )
            if mask.all():
                means = group_means
            for group, order in ranked.items():
                result[group] = var_names[order].to_numpy(dtype=str)
            continue
        sub_X = X[mask] if not mask.all() else X
        if backend == "scanpy":
            ranked = _rank_scanpy(sub_X, groups, reference, var_names)
        else:
            ranked, group_means = _rank_numpy(sub_X, groups, reference, progress=label)
            if mask.all():
                means = group_means
        for group, order in ranked.items():
            result[group] = var_names[order].to_numpy(dtype=str)
    return result, means


def dropout_gene_sets(
    adata: anndata.AnnData,
    ranked: dict[str, np.ndarray],
    *,
    X=None,
    progress: bool = False,
    name_means: dict[str, np.ndarray] | None = None,
) -> dict[str, dict]:
    """GEARS's non-zero / non-dropout gene sets and their top-20 DE genes.

    For condition p with mean profile m_p and the control mean m_c: non-zero genes have
    m_p != 0; non-dropout genes have m_p != 0 or m_c == 0 (a gene off in p but on in
    control is a drop-out). The top-20 lists take the DE ranking restricted to those sets.

    Args:
      adata: dataset with obs 'condition' and 'condition_name'.
      ranked: :func:`rank_genes_vs_control`'s result.
      X: the expression matrix when it is not ``adata.X`` (e.g. on disk).
      progress: show a progress bar.
      name_means: when all cells have one cell type: the mean of X over each
        ``condition_name``'s cells (the control's included), as :func:`group_stats` computes
        it over all cells; then X is not read again. None: computed in one pass over X.

    Returns:
      ``{"top_non_dropout_de_20", "non_dropout_gene_idx", "non_zeros_gene_idx",
      "top_non_zero_de_20"}``, each keyed by condition_name.
    """
    conditions = adata.obs["condition"].astype(str).to_numpy()
    names = adata.obs["condition_name"].astype(str).to_numpy()
    if name_means is None:
        unique, codes = np.unique(conditions, return_inverse=True)
        _, means, _ = group_stats(
            adata.X if X is None else X,
            codes,
            len(unique),
            progress="condition means" if progress else None,
        )
        condition_means = dict(zip(unique, means))
        name_to_condition = dict(zip(names, conditions))
        mean_of = {name: condition_means[name_to_condition[name]] for name in pd.unique(names)}
        ctrl_mean = condition_means[CONTROL]
    else:
        (control_name,) = pd.unique(names[conditions == CONTROL])
        mean_of, ctrl_mean = name_means, name_means[control_name]
    var_names = pd.Index(adata.var_names.astype(str))
    out = {
        "top_non_dropout_de_20": {},
        "non_dropout_gene_idx": {},
        "non_zeros_gene_idx": {},
        "top_non_zero_de_20": {},
    }
    for name, genes in ranked.items():
        mean = mean_of[name]
        non_zero = mean != 0
        non_dropout = non_zero | (ctrl_mean == 0)
        order = var_names.get_indexer(genes)
        out["non_zeros_gene_idx"][name] = np.flatnonzero(non_zero)
        out["non_dropout_gene_idx"][name] = np.flatnonzero(non_dropout)
        out["top_non_dropout_de_20"][name] = var_names[order[non_dropout[order]][:20]].to_numpy(
            dtype=str
        )
        out["top_non_zero_de_20"][name] = var_names[order[non_zero[order]][:20]].to_numpy(dtype=str)
    return out


def add_gears_annotations(
    adata: anndata.AnnData, *, de_backend: str = "scanpy", X=None, progress: bool = False
) -> anndata.AnnData:
    """Adds GEARS's derived obs columns and DE entries in place (and returns `adata`).

    Needs obs 'condition' and 'cell_type' and log1p-normalised X. Adds obs 'dose_val',
    'control', 'condition_name' and uns 'rank_genes_groups_cov_all', 'top_non_dropout_de_20',
    'non_zeros_gene_idx', 'non_dropout_gene_idx', 'top_non_zero_de_20'.

    Args:
      adata: the dataset, modified in place.
      de_backend: see :func:`rank_genes_vs_control`.
      X: the expression matrix when it is not ``adata.X`` (a
        :class:`~scformer_jax.data.backed.BackedCSR` on disk, read in chunks).
      progress: show progress bars.
    """
    conditions = adata.obs["condition"].astype(str)
    cell_types = adata.obs["cell_type"].astype(str)
    adata.obs["dose_val"] = pd.Categorical(conditions.map(condition_dose))
    adata.obs["control"] = (conditions == CONTROL).astype(np.int64).to_numpy()
    adata.obs["condition_name"] = pd.Categorical(
        [condition_name(t, c) for t, c in zip(cell_types, conditions)]
    )
    adata.obs["condition"] = pd.Categorical(conditions.to_numpy())
    adata.obs["cell_type"] = pd.Categorical(cell_types.to_numpy())
    ranked, name_means = _rank_genes(adata, backend=de_backend, X=X, progress=progress)
    adata.uns[DE_KEY] = ranked
    adata.uns.update(
        dropout_gene_sets(adata, ranked, X=X, progress=progress, name_means=name_means)
    )
    return adata
