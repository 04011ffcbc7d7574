"""A loaded Perturb-seq dataset: sparse expression, gene vocabulary, conditions and DE genes.

:class:`PerturbData` is what the batch loader, the trainer and the evaluation read. It keeps
X sparse (CSR, float32) and densifies only the rows a batch needs.

The vocabulary follows the original script (``genes + ["<pad>", "<cls>", "<eoc>"]``): token
``i`` is expression column ``i``; perturbed genes that are not measured come next (each gets
a token so its perturbation flag reaches the model), then the special tokens.
"""

from __future__ import annotations

import collections
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import anndata
import numpy as np
import pandas as pd
from scipy import sparse

from scformer_jax.data.backed import DEFAULT_CACHE_BYTES, BackedCSR, x_nbytes
from scformer_jax.data.conditions import (
    CONTROL,
    DataFormatError,
    parse_condition,
    unique_conditions,
)
from scformer_jax.data.gears_io import (
    DE_KEY,
    PREPARE_HINT,
    UNS_KEYS,
    check_log_values,
    read_gears,
    resolve_h5ad_path,
    validate_gears_adata,
)
from scformer_jax.data.simulate import (
    ON_DISK_PRESETS,
    simulate,
    simulate_to_h5ad,
    simulation_config,
)

PAD_TOKEN = "<pad>"
CLS_TOKEN = "<cls>"
EOC_TOKEN = "<eoc>"
SPECIAL_TOKENS = (PAD_TOKEN, CLS_TOKEN, EOC_TOKEN)
N_TOP_DE = 20
# Cells per block when averaging expression (bounds the memory of a mean over many cells).
MEAN_BLOCK_CELLS = 16384

# Built-in dataset names -> simulation preset.
BUILTIN_DATASETS = {
    "simulated": "default",
    "simulated:default": "default",
    "simulated:tiny": "tiny",
    "simulated:screen": "screen",
    "simulated:norman": "norman",
    "simulated:replogle_essential": "replogle_essential",
    "simulated:genome_wide": "genome_wide",
}


class UnknownGeneError(DataFormatError, KeyError):
    """A condition names a gene that is neither measured nor in the vocabulary."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PerturbData:
    """A GEARS-format Perturb-seq dataset, ready for batching.

    Attributes:
      name: a label for logs.
      X: CSR float32 (n_cells, n_genes), log1p-normalised expression.
      gene_names: str (n_genes,): ``var['gene_name']``.
      var_names: str (n_genes,): the var index (GEARS's DE lists name these).
      cell_conditions: str (n_cells,): ``obs['condition']``.
      cell_types: str (n_cells,): ``obs['cell_type']``.
      conditions: distinct conditions, in order of first appearance.
      condition_cells: condition -> int (n,) cell indices, ascending.
      control_cells: int (n_control,) indices of the 'ctrl' cells.
      control_cells_by_type: cell type -> int (n,) indices of its control cells.
      control_mean: float32 (n_genes,): mean expression of all control cells.
      condition_genes: condition -> tuple of perturbed gene names (``()`` for ctrl).
      condition_name_of: condition -> GEARS condition_name (of its first cell).
      unmeasured_genes: perturbed genes that are not measured, in token order.
      token_names: the vocabulary: gene names, then unmeasured perturbed genes, then
        ``<pad>``, ``<cls>``, ``<eoc>``.
      vocab: token name -> token id (the first column for a duplicated gene name).
      gene_token_ids: int32 (n_genes,): token id of each expression column (= arange).
      pad_token_id, cls_token_id, eoc_token_id, n_tokens: ints.
      de_rank: condition -> int (n_genes,) columns, most differential first (GEARS's
        ``uns['rank_genes_groups_cov_all']``, keyed there by condition_name).
      top_de_20: condition -> int (<=20,): the first 20 of ``de_rank``.
      top_non_dropout_de_20: condition -> int (<=20,) columns (``uns['top_non_dropout_de_20']``).
      non_zeros_gene_idx, non_dropout_gene_idx: condition -> int columns (from ``uns``).
      label_key: obs column of the CLS labels; labels: int32 (n_cells,); label_names: list.
    """

    def __init__(
        self,
        adata: anndata.AnnData,
        *,
        name: str = "dataset",
        label_key: str = "cell_type",
        min_cells: int = 2,
        drop_small_conditions: bool = False,
        require_de: bool = True,
        check_values: bool = True,
        X: BackedCSR | None = None,
        uns: Mapping[str, Any] | None = None,
    ):
        """Builds the dataset from a GEARS-format AnnData (see :func:`load_dataset`).

        Args:
          adata: GEARS layout (obs 'condition', 'cell_type', 'condition_name'; var
            'gene_name'; uns DE entries). Not modified.
          name: a label for logs.
          label_key: obs column whose values are the CLS labels.
          min_cells: the fewest cells a condition may have.
          drop_small_conditions: drop conditions below `min_cells` (with a warning) instead
            of raising.
          require_de: require GEARS's DE entries in ``uns``.
          check_values: check X for NaN/inf, counts, negative or un-logged values.
          X: the expression matrix on disk (then ``adata`` holds only obs, var and uns);
            None: ``adata.X``, held in memory as CSR.
          uns: where the DE tables are when not in ``adata.uns`` (read from disk).

        Raises:
          DataFormatError: naming the missing column/key, malformed condition, small
            conditions, missing controls or bad values.
        """
        if X is not None and X.shape[0] != adata.n_obs:
            raise DataFormatError(
                f"The matrix on disk has {X.shape[0]} rows but obs has {adata.n_obs} cells."
            )
        if drop_small_conditions and "condition" in adata.obs:
            counts = adata.obs["condition"].astype(str).value_counts()
            small = [c for c, n in counts.items() if n < min_cells and c != CONTROL]
            if small:
                warnings.warn(
                    f"Dropping {len(small)} condition(s) with fewer than {min_cells} "
                    f"cells: {small[:10]}{' ...' if len(small) > 10 else ''}.",
                    stacklevel=2,
                )
                if X is not None:
                    raise DataFormatError(
                        f"{len(small)} condition(s) have fewer than {min_cells} cells, and "
                        "cells cannot be dropped from a matrix read from disk. Remove them "
                        "from the file first, or load it in memory (data.backed false)."
                    )
                adata = adata[~adata.obs["condition"].astype(str).isin(small).to_numpy()]
        validate_gears_adata(
            adata, require_de=require_de and uns is None, min_cells=min_cells, check_values=False
        )
        if uns is not None and require_de:
            missing = [k for k in UNS_KEYS if k not in uns]
            if missing:
                raise DataFormatError(
                    f"adata.uns has no {missing}: the DE genes GEARS computes for evaluation. "
                    + PREPARE_HINT
                )
        if label_key not in adata.obs.columns:
            raise DataFormatError(
                f"Label column {label_key!r} (data.label_key) is not in adata.obs (columns: "
                f"{list(adata.obs.columns)}); name an existing column, e.g. 'cell_type'."
            )
        self.name = name
        self.backed = X is not None
        if X is None:
            X = adata.X
            if X is None:
                raise DataFormatError("adata.X is empty; the expression matrix must be in X.")
            self.X: sparse.csr_matrix | BackedCSR = sparse.csr_matrix(X, dtype=np.float32)
            if check_values:
                check_log_values(self.X)
        else:
            self.X = X
            if check_values:
                for _, block in X.row_chunks():
                    check_log_values(block)
        self.n_cells, self.n_genes = self.X.shape
        self.gene_names = adata.var["gene_name"].astype(str).to_numpy()
        self.var_names = np.asarray(adata.var_names.astype(str))
        self.cell_conditions = adata.obs["condition"].astype(str).to_numpy()
        self.cell_types = adata.obs["cell_type"].astype(str).to_numpy()
        cell_condition_names = adata.obs["condition_name"].astype(str).to_numpy()

        # Conditions and their cells, grouped in one sort.
        self.conditions = unique_conditions(self.cell_conditions)
        codes = pd.Index(self.conditions).get_indexer(self.cell_conditions)
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(self.conditions) + 1))
        self.condition_cells = {
            c: order[bounds[i] : bounds[i + 1]] for i, c in enumerate(self.conditions)
        }
        self.condition_genes = {c: parse_condition(c) for c in self.conditions}
        self.condition_name_of = {
            c: str(cell_condition_names[cells[0]]) for c, cells in self.condition_cells.items()
        }
        self.control_cells = self.condition_cells[CONTROL]
        self.control_cells_by_type = {
            t: self.control_cells[self.cell_types[self.control_cells] == t]
            for t in pd.unique(self.cell_types[self.control_cells])
        }
        self.control_mean = self.mean_expression(self.control_cells)

        # Vocabulary.
        self._column_of: dict[str, int] = {}
        for column, gene in enumerate(self.gene_names):
            self._column_of.setdefault(gene, column)
        perturbed = unique_conditions([g for c in self.conditions for g in self.condition_genes[c]])
        duplicated = sorted(g for g in perturbed if np.count_nonzero(self.gene_names == g) > 1)
        if duplicated:
            warnings.warn(
                f"Perturbed gene(s) {duplicated[:10]} appear in several columns of "
                "var['gene_name']; flags mark the first column.",
                stacklevel=2,
            )
        self.unmeasured_genes = [g for g in perturbed if g not in self._column_of]
        if self.unmeasured_genes:
            warnings.warn(
                f"{len(self.unmeasured_genes)} perturbed gene(s) are not among the measured "
                f"genes: {self.unmeasured_genes[:10]}"
                f"{' ...' if len(self.unmeasured_genes) > 10 else ''}. Each becomes an extra "
                "input token with flag 1 and expression 0 (never dropped).",
                stacklevel=2,
            )
        self.token_names = (
            list(self.gene_names) + list(self.unmeasured_genes) + list(SPECIAL_TOKENS)
        )
        self.vocab = dict(self._column_of)
        for i, gene in enumerate(self.unmeasured_genes):
            self.vocab[gene] = self.n_genes + i
        base = self.n_genes + len(self.unmeasured_genes)
        self.pad_token_id, self.cls_token_id, self.eoc_token_id = base, base + 1, base + 2
        for i, token in enumerate(SPECIAL_TOKENS):
            self.vocab.setdefault(token, base + i)
        self.n_tokens = base + len(SPECIAL_TOKENS)
        self.gene_token_ids = np.arange(self.n_genes, dtype=np.int32)

        self._read_de(adata.uns if uns is None else uns, require_de)

        # CLS labels.
        self.label_key = label_key
        label_values = adata.obs[label_key]
        if label_values.isna().any():
            raise DataFormatError(
                f"obs[{label_key!r}] (the CLS labels) is missing for "
                f"{int(label_values.isna().sum())} cells; fill it."
            )
        label_values = label_values.astype(str).to_numpy()
        self.label_names = sorted(pd.unique(label_values))
        self.labels = pd.Index(self.label_names).get_indexer(label_values).astype(np.int32)

    # ------------------------------------------------------------------------- DE genes

    def _read_de(self, uns: Mapping[str, Any], require_de: bool) -> None:
        var_index = pd.Index(self.var_names)

        def columns(values, what: str, key: str) -> np.ndarray:
            values = np.asarray(values)
            if values.size == 0:
                return np.zeros(0, np.int64)
            if np.issubdtype(values.dtype, np.integer):
                return values.astype(np.int64)
            found = var_index.get_indexer(values.astype(str))
            if (found < 0).any():
                missing = values.astype(str)[found < 0][:5].tolist()
                raise DataFormatError(
                    f"uns[{key!r}][{what!r}] names genes that are not var names: {missing}."
                )
            return found.astype(np.int64)

        self.de_rank: dict[str, np.ndarray] = {}
        self.top_de_20: dict[str, np.ndarray] = {}
        self.top_non_dropout_de_20: dict[str, np.ndarray] = {}
        self.non_zeros_gene_idx: dict[str, np.ndarray] = {}
        self.non_dropout_gene_idx: dict[str, np.ndarray] = {}
        if DE_KEY not in uns:
            return
        tables = {
            "de": uns.get(DE_KEY, {}),
            "nd20": uns.get("top_non_dropout_de_20", {}),
            "nz": uns.get("non_zeros_gene_idx", {}),
            "ndi": uns.get("non_dropout_gene_idx", {}),
        }
        missing = []
        if isinstance(tables["de"], _LazyTable):
            # Read from disk: the full-length tables are read per condition when asked for
            # (thousands of conditions x genes would take gigabytes); the top-20 lists now.
            keys = {
                c: self.condition_name_of[c]
                for c in self.conditions
                if c != CONTROL and self.condition_name_of[c] in tables["de"]
            }
            missing = [c for c in self.conditions if c != CONTROL and c not in keys]
            self.de_rank = _LazyColumns(tables["de"], keys, columns, DE_KEY)
            self.top_de_20 = _LazyColumns(tables["de"], keys, columns, DE_KEY, head=N_TOP_DE)
            for attr, table, name in (
                ("non_zeros_gene_idx", tables["nz"], "non_zeros_gene_idx"),
                ("non_dropout_gene_idx", tables["ndi"], "non_dropout_gene_idx"),
            ):
                present = {c: k for c, k in keys.items() if k in table}
                setattr(self, attr, _LazyColumns(table, present, columns, name))
            for c, key in keys.items():
                if key in tables["nd20"]:
                    self.top_non_dropout_de_20[c] = columns(
                        tables["nd20"][key], key, "top_non_dropout_de_20"
                    )
        for condition in [] if isinstance(tables["de"], _LazyTable) else self.conditions:
            if condition == CONTROL:
                continue
            key = self.condition_name_of[condition]
            if key not in tables["de"]:
                missing.append(condition)
                continue
            self.de_rank[condition] = columns(tables["de"][key], key, DE_KEY)
            self.top_de_20[condition] = self.de_rank[condition][:N_TOP_DE]
            if key in tables["nd20"]:
                self.top_non_dropout_de_20[condition] = columns(
                    tables["nd20"][key], key, "top_non_dropout_de_20"
                )
            if key in tables["nz"]:
                self.non_zeros_gene_idx[condition] = columns(
                    tables["nz"][key], key, "non_zeros_gene_idx"
                )
            if key in tables["ndi"]:
                self.non_dropout_gene_idx[condition] = columns(
                    tables["ndi"][key], key, "non_dropout_gene_idx"
                )
        if missing:
            message = (
                f"{len(missing)} condition(s) have no DE genes in uns[{DE_KEY!r}]: "
                f"{missing[:10]}{' ...' if len(missing) > 10 else ''}."
            )
            if require_de:
                raise DataFormatError(
                    message + " Recompute them with `python -m "
                    "scformer_jax.data prepare` (or gears_io.prepare), or "
                    "load with require_de=False (no DE-gene metrics)."
                )
            warnings.warn(message, stacklevel=3)

    def de_indices(
        self, condition: str, n: int = N_TOP_DE, *, non_dropout: bool = False
    ) -> np.ndarray:
        """Expression columns of a condition's top-`n` DE genes, most differential first.

        Args:
          condition: a GEARS condition string (not 'ctrl').
          n: how many (at most 20 with `non_dropout`, GEARS's stored list).
          non_dropout: restrict to non-dropout genes (GEARS's ``top_non_dropout_de_20``).

        Raises:
          KeyError: for a condition without DE genes, naming it.
        """
        table = self.top_non_dropout_de_20 if non_dropout else self.de_rank
        if condition not in table:
            raise KeyError(
                f"No DE genes for condition {condition!r} (control cells have none; "
                f"other conditions get them from uns[{DE_KEY!r}])."
            )
        return table[condition][:n]

    # ------------------------------------------------------------------------- tokens

    def column_of(self, gene: str) -> int:
        """Expression column of a measured gene, -1 for a perturbed gene not measured."""
        if gene in self._column_of:
            return self._column_of[gene]
        if gene in self.vocab:
            return -1
        raise UnknownGeneError(
            f"Unknown gene {gene!r}: it is neither measured (var['gene_name']) nor a perturbed "
            f"gene of this dataset, so it has no token. Known perturbed genes: "
            f"{sorted(set(g for gs in self.condition_genes.values() for g in gs))[:20]}."
        )

    def perturbed_tokens(self, condition: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and expression columns (-1 if unmeasured) of a condition's genes.

        Works for any well-formed condition whose genes have tokens, including ones not
        in the data (e.g. a double to predict).

        Returns:
          token_ids int32 (k,), columns int64 (k,), k = 0, 1 or 2.

        Raises:
          DataFormatError: malformed condition; UnknownGeneError: a gene without a token.
        """
        genes = self.condition_genes.get(condition)
        if genes is None:
            genes = parse_condition(condition)
        columns = np.array([self.column_of(g) for g in genes], dtype=np.int64)
        tokens = np.array([self.vocab[g] for g in genes], dtype=np.int32)
        return tokens, columns

    # ------------------------------------------------------------------------- expression

    def rows(self, cell_indices: Sequence[int] | np.ndarray) -> sparse.csr_matrix:
        """CSR float32 (n, n_genes): the given cells' expression (from disk when backed)."""
        cells = np.asarray(cell_indices, dtype=np.int64)
        if self.backed:
            return self.X.rows(cells)
        return self.X[cells]

    def dense_rows(self, cell_indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 (n, n_genes): expression of the given cells, densified."""
        cells = np.asarray(cell_indices, dtype=np.int64)
        if self.backed:
            return self.X.dense_rows(cells)
        return self.X[cells].toarray()

    def mean_expression(self, cell_indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 (n_genes,): mean expression of the given cells (no dense copy).

        Summed in float64 over blocks of cells, the same way in memory and on disk.
        """
        cells = np.asarray(cell_indices, dtype=np.int64)
        total = np.zeros(self.n_genes, np.float64)
        for block in self._row_blocks(cells):
            total += np.asarray(block.sum(axis=0, dtype=np.float64)).ravel()
        with np.errstate(invalid="ignore", divide="ignore"):
            return (total / len(cells)).astype(np.float32)

    def expression_moments(
        self, cell_indices: Sequence[int] | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """float64 (n_genes,) mean expression of the given cells and the sum of their squared
        deviations from it, in one pass over the same blocks as :meth:`mean_expression`
        (whose mean, cast to float32, this mean equals)."""
        cells = np.asarray(cell_indices, dtype=np.int64)
        total = np.zeros(self.n_genes, np.float64)
        square = np.zeros(self.n_genes, np.float64)
        for block in self._row_blocks(cells):
            total += np.asarray(block.sum(axis=0, dtype=np.float64)).ravel()
            square += np.asarray(block.multiply(block).sum(axis=0, dtype=np.float64)).ravel()
        mean = total / max(len(cells), 1)
        return mean, np.maximum(square - len(cells) * mean**2, 0.0)

    def _row_blocks(self, cells: np.ndarray):
        """The given cells' rows (CSR), MEAN_BLOCK_CELLS at a time."""
        for start in range(0, len(cells), MEAN_BLOCK_CELLS):
            yield self.rows(cells[start : start + MEAN_BLOCK_CELLS])

    def condition_mean(self, condition: str) -> np.ndarray:
        """float32 (n_genes,): mean expression of a condition's cells."""
        if condition not in self.condition_cells:
            raise KeyError(f"Condition {condition!r} is not in the dataset {self.name!r}.")
        return self.mean_expression(self.condition_cells[condition])

    def cells_of(self, conditions: Sequence[str]) -> np.ndarray:
        """int (n,) ascending indices of the cells of the given conditions."""
        unknown = [c for c in conditions if c not in self.condition_cells]
        if unknown:
            raise KeyError(
                f"Condition(s) {unknown[:10]} are not in the dataset {self.name!r} "
                f"(it has {len(self.conditions)} conditions, e.g. "
                f"{self.conditions[:5]})."
            )
        if not len(conditions):
            return np.zeros(0, np.int64)
        return np.sort(np.concatenate([self.condition_cells[c] for c in conditions]))

    def __repr__(self) -> str:
        return (
            f"PerturbData({self.name!r}: {self.n_cells} cells x {self.n_genes} genes, "
            f"{len(self.conditions)} conditions, {len(self.control_cells)} control cells, "
            f"{self.n_tokens} tokens)"
        )


BACKED_CHOICES = ("auto", True, False)
# data.backed "auto" reads X from disk when it would take more than this in memory (CSR).
DEFAULT_BACKED_ABOVE_GB = 4.0
CACHE_ENV = "SCFORMER_JAX_CACHE"


def default_cache_dir() -> Path:
    """Where built-in datasets generated to disk are kept: ``$SCFORMER_JAX_CACHE``, else
    ``$XDG_CACHE_HOME/scformer-jax`` (``~/.cache/scformer-jax``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "scformer-jax"


def simulated_path(
    preset: str,
    seed: int,
    overrides: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The cache file of a built-in simulated dataset (one per preset, seed and overrides)."""
    import hashlib
    import json

    name = f"simulated_{preset}_seed{int(seed)}"
    if overrides:
        digest = hashlib.sha1(json.dumps(dict(overrides), sort_keys=True).encode()).hexdigest()
        name += f"_{digest[:10]}"
    return Path(cache_dir or default_cache_dir()) / f"{name}.h5ad"


def _check_backed(backed) -> None:
    if (
        backed not in BACKED_CHOICES
        or isinstance(backed, (int, float))
        and not isinstance(backed, bool)
    ):
        raise ValueError(f"backed must be 'auto', true or false (data.backed), got {backed!r}.")


def use_backed(file: str | os.PathLike, backed, above_gb: float = DEFAULT_BACKED_ABOVE_GB) -> bool:
    """Whether to read X of an ``.h5ad`` file from disk: `backed` True/False, or "auto":
    when X, or the whole file (X and the per-condition DE tables, which at thousands of
    conditions take gigabytes as Python strings), would take more than `above_gb` GB."""
    _check_backed(backed)
    if backed == "auto":
        size = max(x_nbytes(file), Path(file).stat().st_size)
        return size > above_gb * 2**30
    return bool(backed)


class _LazyTable(Mapping):
    """A group of arrays in an open ``.h5ad`` file (one of GEARS's per-condition DE tables),
    each read when asked for: the DE rankings of thousands of conditions as Python strings
    would take gigabytes."""

    def __init__(self, group):
        self._group = group
        self._keys = list(group.keys())

    def __getitem__(self, key: str):
        from anndata.io import read_elem

        if key not in self._group:
            raise KeyError(key)
        return read_elem(self._group[key])

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and key in self._group

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class _LazyColumns(Mapping):
    """condition -> expression columns of a per-condition gene table on disk, read and
    converted when asked for (the last few kept)."""

    def __init__(self, table, keys: Mapping[str, str], convert, what: str, head: int | None = None):
        self._table, self._keys, self._convert = table, dict(keys), convert
        self._what, self._head = what, head
        self._recent: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

    def __getitem__(self, condition: str) -> np.ndarray:
        if condition in self._recent:
            self._recent.move_to_end(condition)
            return self._recent[condition]
        key = self._keys[condition]  # KeyError for a condition without the table
        value = self._convert(self._table[key], key, self._what)
        if self._head is not None:
            value = value[: self._head].copy()
        self._recent[condition] = value
        while len(self._recent) > 64:
            self._recent.popitem(last=False)
        return value

    def __contains__(self, condition) -> bool:
        return condition in self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _open_backed(file: Path, cache_bytes: int) -> tuple[anndata.AnnData, dict[str, Any], BackedCSR]:
    """An ``.h5ad`` file's obs and var in memory (an AnnData without X), its uns (the
    per-condition DE tables read lazily) and its X on disk."""
    from anndata.io import read_elem

    try:
        X = BackedCSR(file, cache_bytes=cache_bytes)
    except OSError as e:
        raise DataFormatError(f"Could not read {str(file)!r} as an .h5ad file: {e}") from e
    try:
        f = X.file
        obs, var = read_elem(f["obs"]), read_elem(f["var"])
        uns: dict[str, Any] = {}
        if "uns" in f:
            for key, item in f["uns"].items():
                if key in UNS_KEYS or key == "top_non_zero_de_20":
                    uns[key] = _LazyTable(item)
                else:
                    uns[key] = read_elem(item)
    except (KeyError, OSError) as e:
        X.close()
        raise DataFormatError(f"Could not read {str(file)!r} as an .h5ad file: {e}") from e
    return anndata.AnnData(obs=obs, var=var), uns, X


def load_dataset(
    path_or_name: str | os.PathLike | anndata.AnnData,
    *,
    label_key: str = "cell_type",
    seed: int = 0,
    preset: str | None = None,
    simulation: Mapping[str, Any] | None = None,
    min_cells: int = 2,
    drop_small_conditions: bool = False,
    require_de: bool = True,
    check_values: bool = True,
    backed: bool | str = "auto",
    backed_above_gb: float = DEFAULT_BACKED_ABOVE_GB,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    cache_dir: str | os.PathLike | None = None,
) -> PerturbData:
    """Loads a dataset from a GEARS data folder, an ``.h5ad`` file or a built-in name.

    Args:
      path_or_name: a folder with ``perturb_processed.h5ad``, an ``.h5ad`` file, an AnnData,
        or a built-in name: ``"simulated"`` (the default simulated dataset),
        ``"simulated:tiny"`` (tests), ``"simulated:screen"`` (a single-gene knock-out
        screen whose perturbed genes are mostly not measured), ``"simulated:norman"``
        (Norman-sized, benchmarks), ``"simulated:replogle_essential"`` and
        ``"simulated:genome_wide"`` (Replogle 2022's K562 screens' sizes, generated once
        into `cache_dir` chunk by chunk, and read from there).
      label_key: obs column of the CLS labels.
      seed: simulation seed (built-in names only).
      preset: simulation preset overriding the one in the name (built-in names only).
      simulation: :class:`~scformer_jax.data.simulate.SimulationConfig` field overrides
        (built-in names only).
      min_cells, drop_small_conditions, require_de, check_values: see :class:`PerturbData`.
      backed: read X from the file on disk (True), hold it in memory (False), or "auto":
        from disk when it would take more than `backed_above_gb` GB in memory. An AnnData
        passed in is always in memory.
      backed_above_gb: the threshold of "auto".
      cache_bytes: most bytes of rows the disk reader caches.
      cache_dir: where built-in datasets generated to disk are kept (None:
        :func:`default_cache_dir`).

    Raises:
      DataFormatError: a path that does not exist and is not a built-in name, or a dataset
        that fails the checks.
    """
    _check_backed(backed)
    options = dict(
        label_key=label_key,
        min_cells=min_cells,
        drop_small_conditions=drop_small_conditions,
        require_de=require_de,
        check_values=check_values,
    )
    if isinstance(path_or_name, anndata.AnnData):
        if backed is True:
            raise DataFormatError(
                "backed=True needs an .h5ad file on disk, not an AnnData in memory; write it "
                "with adata.write_h5ad(path) and pass the path."
            )
        return PerturbData(path_or_name, name="anndata", **options)
    text = str(path_or_name)
    path = Path(text).expanduser()
    name = path.name if path.is_dir() else path.stem
    if not path.exists() and text in BUILTIN_DATASETS:
        chosen = preset or BUILTIN_DATASETS[text]
        cfg = simulation_config(chosen, **dict(simulation or {}))
        name = f"simulated:{chosen}"
        if chosen not in ON_DISK_PRESETS and backed is not True:
            return PerturbData(simulate(cfg, seed=seed), name=name, **options)
        path = simulated_path(chosen, seed, simulation, cache_dir)
        if not path.exists():
            print(f"Generating {name} (seed {seed}) into {path} (once) ...", flush=True)
            simulate_to_h5ad(cfg, path, seed=seed, progress=True)
    elif preset is not None or simulation:
        raise DataFormatError(
            f"preset/simulation options apply only to the built-in names "
            f"{sorted(BUILTIN_DATASETS)}, not to {text!r}."
        )
    if path.exists():
        file = resolve_h5ad_path(path)
        if use_backed(file, backed, backed_above_gb):
            meta, uns, X = _open_backed(file, cache_bytes)
            return PerturbData(meta, name=name, X=X, uns=uns, **options)
        adata = read_gears(path)
        return PerturbData(adata, name=name, **options)
    raise DataFormatError(
        f"{text!r} is neither an existing GEARS data folder or .h5ad file nor a built-in "
        f"dataset name ({', '.join(sorted(BUILTIN_DATASETS))})."
    )
