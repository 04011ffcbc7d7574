"""``prepare``: any Perturb-seq AnnData with a per-cell perturbation column -> GEARS's
processed layout (conditions, cell types, normalised log1p X, DE genes).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

from scformer_jax.data.backed import BackedCSR, CSRWriter, write_metadata
from scformer_jax.data.conditions import CONTROL, DataFormatError, parse_condition
from scformer_jax.data.de import add_gears_annotations
from scformer_jax.data.gears_io import (
    check_columns,
    check_finite,
    check_log_values,
    check_unique_var_names,
    looks_like_counts,
)
from scformer_jax.io import atomic_path

_CODE_LABEL = re.compile(r"[+-]?\d+(\.0+)?")


def _check_labels_are_genes(
    perturbed: Sequence[str], gene_names: Sequence[str], perturbation_key: str
) -> None:
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
        "--labels-are-gene-names (labels_are_gene_names=True)."
    )


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
            f"{control_label!r}, one gene, or two genes joined by {separator!r}."
        )
    condition = f"{genes[0]}+{CONTROL}" if len(genes) == 1 else f"{genes[0]}+{genes[1]}"
    try:
        parse_condition(condition)
    except DataFormatError as e:
        raise DataFormatError(f"Perturbation label {label!r}: {e}") from None
    return condition


def _prepared_frames(
    adata: anndata.AnnData,
    *,
    perturbation_key: str,
    control_label: str,
    cell_type_key: str | None,
    cell_type: str,
    gene_name_key: str | None,
    combo_separator: str,
    min_cells: int,
    labels_are_gene_names: bool,
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]:
    """obs and var of the prepared dataset from the input's obs and var (X is not read).

    Returns:
      obs (the input's columns plus 'condition', 'cell_type'), var (plus 'gene_name'),
      the gene names and each cell's condition.
    """
    check_columns(
        adata.obs,
        [perturbation_key],
        "adata.obs",
        "Pass the obs column that holds each cell's perturbed gene(s) as "
        "--perturbation-key / perturbation_key.",
    )
    if cell_type_key is not None:
        check_columns(
            adata.obs,
            [cell_type_key],
            "adata.obs",
            "Pass an existing column as --cell-type-key, or leave it out to use one "
            "cell type for all cells (--cell-type NAME).",
        )
    if gene_name_key is not None:
        check_columns(
            adata.var,
            [gene_name_key],
            "adata.var",
            "Pass the var column holding gene symbols as --gene-name-key, or leave it "
            "out to use the var names.",
        )
    check_unique_var_names(adata)
    labels = adata.obs[perturbation_key]
    if labels.isna().any():
        first = adata.obs_names[labels.isna().to_numpy()][0]
        raise DataFormatError(
            f"obs[{perturbation_key!r}] is missing for {int(labels.isna().sum())} cells (first: "
            f"{first!r}). Label every cell (controls with {control_label!r}) or drop them."
        )
    labels = labels.astype(str).to_numpy()
    if not np.any(labels == control_label):
        examples = list(pd.unique(labels)[:8])
        raise DataFormatError(
            f"No control cells: no cell has obs[{perturbation_key!r}] == {control_label!r} "
            f"(values include {examples}). Pass the label your data use for control cells as "
            "--control-label."
        )
    unique_labels = pd.unique(labels)
    mapping = {
        label: _user_label_to_condition(label, control_label, combo_separator)
        for label in unique_labels
    }
    conditions = pd.Series(labels).map(mapping).to_numpy()
    gene_names = (
        adata.var[gene_name_key].astype(str).to_numpy()
        if gene_name_key is not None
        else adata.var_names.astype(str).to_numpy()
    )
    if not labels_are_gene_names:
        _check_labels_are_genes(
            sorted({g for c in mapping.values() for g in parse_condition(c)}),
            gene_names,
            perturbation_key,
        )
    counts = pd.Series(conditions).value_counts()
    small = counts[counts < min_cells]
    if len(small):
        listed = ", ".join(f"{c!r} ({n})" for c, n in small.head(10).items())
        raise DataFormatError(
            f"{len(small)} condition(s) have fewer than {min_cells} cells: {listed}"
            f"{' ...' if len(small) > 10 else ''}. The t-test behind the DE genes needs at "
            f"least {min_cells} cells per condition; remove those cells first, e.g. "
            f"adata = adata[adata.obs[{perturbation_key!r}].map(adata.obs[{perturbation_key!r}]"
            f".value_counts()) >= {min_cells}]."
        )

    if cell_type_key is not None:
        if adata.obs[cell_type_key].isna().any():
            raise DataFormatError(
                f"obs[{cell_type_key!r}] is missing for "
                f"{int(adata.obs[cell_type_key].isna().sum())} cells; fill it or drop them."
            )
        cell_types = adata.obs[cell_type_key].astype(str).to_numpy()
    else:
        cell_types = np.full(adata.n_obs, str(cell_type), dtype=object)
    for t in pd.unique(cell_types):
        if "_" in t:
            warnings.warn(
                f"Cell type {t!r} contains '_', which GEARS also uses to join "
                "condition_name; names stay unambiguous here.",
                stacklevel=2,
            )

    obs = adata.obs.copy()
    obs["condition"] = conditions
    obs["cell_type"] = cell_types
    var = pd.DataFrame(index=pd.Index(adata.var_names.astype(str)))
    for column in adata.var.columns:
        var[column] = adata.var[column].to_numpy()
    var["gene_name"] = gene_names
    return obs, var, gene_names, conditions


def prepare(
    adata: anndata.AnnData,
    *,
    perturbation_key: str,
    control_label: str,
    cell_type_key: str | None = None,
    cell_type: str = "cell",
    gene_name_key: str | None = None,
    combo_separator: str = "+",
    normalize: bool | None = None,
    target_sum: float = 1e4,
    min_cells: int = 2,
    de_backend: str = "scanpy",
    labels_are_gene_names: bool = False,
) -> anndata.AnnData:
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

    obs, var, gene_names, conditions = _prepared_frames(
        adata,
        perturbation_key=perturbation_key,
        control_label=control_label,
        cell_type_key=cell_type_key,
        cell_type=cell_type,
        gene_name_key=gene_name_key,
        combo_separator=combo_separator,
        min_cells=min_cells,
        labels_are_gene_names=labels_are_gene_names,
    )
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
            "log1p-normalised. Use --normalize auto/yes to normalise and log-transform it."
        )
    if normalize and not is_counts:
        warnings.warn(
            "normalize=True on a matrix that is not integer counts; normalising and "
            "log-transforming it anyway.",
            stacklevel=2,
        )

    out = anndata.AnnData(X=X, obs=obs, var=var)
    if normalize:
        sc.pp.normalize_total(out, target_sum=target_sum)
        sc.pp.log1p(out)
        out.X = sparse.csr_matrix(out.X, dtype=np.float32)
    check_log_values(out.X)

    _warn_unmeasured(gene_names, conditions)
    return add_gears_annotations(out, de_backend=de_backend)


def _warn_unmeasured(gene_names: np.ndarray, conditions: np.ndarray) -> None:
    measured = set(gene_names)
    unmeasured = sorted({g for c in pd.unique(conditions) for g in parse_condition(c)} - measured)
    if unmeasured:
        warnings.warn(
            f"{len(unmeasured)} perturbed gene(s) are not among the measured genes: "
            f"{unmeasured[:10]}{' ...' if len(unmeasured) > 10 else ''}. They become extra "
            "input tokens (flag 1, expression 0).",
            stacklevel=3,
        )


def prepare_h5ad(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    perturbation_key: str,
    control_label: str,
    cell_type_key: str | None = None,
    cell_type: str = "cell",
    gene_name_key: str | None = None,
    combo_separator: str = "+",
    normalize: bool | None = None,
    target_sum: float = 1e4,
    min_cells: int = 2,
    labels_are_gene_names: bool = False,
    chunk_rows: int = 8192,
    progress: bool = False,
) -> Path:
    """:func:`prepare` for an ``.h5ad`` file larger than memory, chunk by chunk.

    Reads X (CSR) of `source` one block of `chunk_rows` cells at a time, normalises and
    log-transforms each block as :func:`prepare` does (scanpy's ``normalize_total`` and
    ``log1p``, which treat every cell on its own, so the values are the same), appends it to
    `output`, and computes the DE genes in chunked passes over the written file (the numpy
    backend: the same t-test as scanpy's). Memory: a block of cells, the per-condition
    statistics (conditions x genes, float64) and obs. The output is written under a temporary
    name and renamed when complete.

    Args:
      source: the input ``.h5ad`` (X stored as CSR).
      output: the ``.h5ad`` to write.
      chunk_rows: cells per block.
      progress: progress bars on stderr.
      Others: as :func:`prepare`.

    Returns:
      The path written.

    Raises:
      DataFormatError: as :func:`prepare`, and for an X that is not stored as CSR.
    """
    import h5py
    import scanpy as sc
    from anndata.io import read_elem
    from tqdm import tqdm

    source, output = Path(source), Path(output)
    X = BackedCSR(source)
    try:
        meta = anndata.AnnData(obs=read_elem(X.file["obs"]), var=read_elem(X.file["var"]))
        obs, var, gene_names, conditions = _prepared_frames(
            meta,
            perturbation_key=perturbation_key,
            control_label=control_label,
            cell_type_key=cell_type_key,
            cell_type=cell_type,
            gene_name_key=gene_name_key,
            combo_separator=combo_separator,
            min_cells=min_cells,
            labels_are_gene_names=labels_are_gene_names,
        )
        # One pass for the checks that decide what to do (NaN/inf, counts or log values).
        is_counts = True
        for _, block in X.row_chunks(chunk_rows):
            check_finite(block)
            is_counts = is_counts and looks_like_counts(block)
        if normalize is None:
            normalize = is_counts
        elif normalize is False and is_counts:
            raise DataFormatError(
                "X holds raw counts (all values are integers) but normalize=False says it is "
                "log1p-normalised. Use --normalize auto/yes to normalise and log-transform it."
            )
        if normalize and not is_counts:
            warnings.warn(
                "normalize=True on a matrix that is not integer counts; normalising and "
                "log-transforming it anyway.",
                stacklevel=2,
            )
        with atomic_path(output, suffix=".h5ad") as tmp:
            with h5py.File(tmp, "w") as f:
                writer = CSRWriter(f, X.shape[1])
                chunks = X.row_chunks(chunk_rows)
                if progress:
                    total = -(-X.shape[0] // chunk_rows)
                    chunks = tqdm(chunks, desc="normalise", total=total, unit="chunk")
                for _, block in chunks:
                    block = sparse.csr_matrix(block, dtype=np.float32, copy=True)
                    if normalize:
                        part = anndata.AnnData(X=block)
                        sc.pp.normalize_total(part, target_sum=target_sum)
                        sc.pp.log1p(part)
                        block = sparse.csr_matrix(part.X, dtype=np.float32)
                    check_log_values(block)
                    writer.append(block.data, block.indices, np.diff(block.indptr))
                writer.close()
            _warn_unmeasured(gene_names, conditions)
            written = BackedCSR(tmp)
            try:
                out = anndata.AnnData(obs=obs, var=var)
                add_gears_annotations(out, de_backend="numpy", X=written, progress=progress)
            finally:
                written.close()
            if normalize:
                out.uns["log1p"] = {"base": None}  # what scanpy's log1p records
            write_metadata(tmp, out)
    finally:
        X.close()
    return output
