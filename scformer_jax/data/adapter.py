"""GEARS batch -> two-channel :class:`~scformer_jax.batch.PerturbBatch`.

For people who already have GEARS data loaders. A GEARS (torch_geometric) batch holds

* ``x``: (batch * n_genes, 1) control expression (GEARS >= 0.0.3) or (batch * n_genes, 2)
  with a flag column (older releases),
* ``y``: (batch, n_genes) perturbed expression,
* ``pert``: the condition string of each cell (``"A+B"``, ``"A+ctrl"``, ``"ctrl"``),
* ``pert_idx``: per cell, positions of the perturbed genes in GEARS's GO-graph gene list
  ``pert_names`` -- *not* expression columns.

The original script read flags from ``x[:, 1]`` (an IndexError on the one-column layout) and
the obvious repair, using ``pert_idx`` as columns, flags the wrong genes. Here the flags come
from the condition names mapped onto ``gene_names``; ``pert_idx`` is only cross-checked.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from scformer_jax.batch import DEFAULT_PERT_PAD_ID, PerturbBatch
from scformer_jax.data.conditions import parse_condition


def _numpy(array: Any) -> np.ndarray:
    """A torch tensor (any device) or array-like -> NumPy."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def from_gears_batch(
    x: Any,
    y: Any,
    pert: Sequence[str],
    pert_idx: Any = None,
    pert_names: Sequence[str] | None = None,
    *,
    gene_names: Sequence[str],
    vocab: Mapping[str, int] | Any = None,
    pad_token_id: int | None = None,
    pad_value: float = 0.0,
    pert_pad_id: int = DEFAULT_PERT_PAD_ID,
    labels: Any = None,
) -> PerturbBatch:
    """Converts a GEARS batch into the two-channel batch, all genes in column order.

    Args:
      x: (batch * n_genes, 1) or (batch * n_genes, 2) (or (batch * n_genes,)) control
        expression, gene-major within each cell; a second column (old GEARS flags) is ignored
        except for a warning when it disagrees with the condition names.
      y: (batch, n_genes) target expression.
      pert: batch condition strings, GEARS format.
      pert_idx: optional, per cell a list of positions into `pert_names` (GEARS's
        ``batch.pert_idx``; -1 for none). With `pert_names` it is checked against `pert`.
      pert_names: GEARS's ``pert_data.pert_names`` (the GO-graph gene list).
      gene_names: (n_genes,) the expression columns' gene names
        (``pert_data.adata.var['gene_name']``).
      vocab: gene name -> token id, or a :class:`~scformer_jax.data.PerturbData` (its
        vocabulary). None: token id = column, as in the original script's vocabulary, with
        no room for unmeasured genes.
      pad_token_id: token id at padding; default: the vocabulary's ``<pad>`` (n_genes when
        `vocab` is None).
      pad_value: expression at padding positions.
      pert_pad_id: flag at padding positions.
      labels: optional int (batch,) CLS labels.

    Returns:
      A NumPy :class:`PerturbBatch` of shape (batch, n_genes + most unmeasured genes of a
      cell): the genes in column order, then each cell's unmeasured perturbed genes (flag 1,
      expression 0, with a warning), then padding.

    Raises:
      ValueError: shapes that do not fit, `pert` of the wrong length, malformed
        conditions, a gene with no token, or `pert_idx` naming other genes than `pert`.
    """
    gene_names = [str(g) for g in gene_names]
    n_genes = len(gene_names)
    y = _numpy(y).astype(np.float32)
    if y.ndim != 2 or y.shape[1] != n_genes:
        raise ValueError(
            f"y must be (batch, n_genes) = (batch, {n_genes}); got {y.shape}. "
            "Pass gene_names = pert_data.adata.var['gene_name'] of the same data."
        )
    batch = y.shape[0]
    x = _numpy(x).astype(np.float32)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] != batch * n_genes or x.shape[1] not in (1, 2):
        raise ValueError(
            f"x must be (batch * n_genes, 1) or (batch * n_genes, 2) = ({batch * n_genes}, 1|2) "
            f"for y of shape {y.shape}; got {x.shape}."
        )
    pert = [str(p) for p in pert]
    if len(pert) != batch:
        raise ValueError(f"pert has {len(pert)} conditions for a batch of {batch} cells.")
    control_values = x[:, 0].reshape(batch, n_genes)

    column_of: dict[str, int] = {}
    for column, gene in enumerate(gene_names):
        column_of.setdefault(gene, column)
    if vocab is not None and hasattr(vocab, "vocab") and hasattr(vocab, "pad_token_id"):
        if pad_token_id is None:
            pad_token_id = vocab.pad_token_id
        vocab = vocab.vocab
    if vocab is None:
        token_of_column = np.arange(n_genes, dtype=np.int64)
        pad_token_id = n_genes if pad_token_id is None else pad_token_id
    else:
        missing = [g for g in gene_names if g not in vocab]
        if missing:
            raise ValueError(
                f"{len(missing)} expression genes are not in vocab, e.g. "
                f"{missing[:5]}; use the vocabulary the model was trained with."
            )
        token_of_column = np.array([vocab[g] for g in gene_names], dtype=np.int64)
        if pad_token_id is None:
            if "<pad>" not in vocab:
                raise ValueError("vocab has no '<pad>' token; pass pad_token_id.")
            pad_token_id = vocab["<pad>"]

    genes_per_row = [parse_condition(p) for p in pert]
    if pert_idx is not None and pert_names is not None:
        names = [str(n) for n in pert_names]
        for row, (given, genes) in enumerate(zip(pert_idx, genes_per_row)):
            positions = [int(i) for i in np.ravel(_numpy(given)) if int(i) >= 0]
            if any(i >= len(names) for i in positions):
                raise ValueError(
                    f"pert_idx of cell {row} ({positions}) is out of range for "
                    f"{len(names)} pert_names."
                )
            if sorted(names[i] for i in positions) != sorted(genes):
                raise ValueError(
                    f"Cell {row}: pert_idx points at {[names[i] for i in positions]} in "
                    f"pert_names, but its condition {pert[row]!r} names {list(genes)}. pert_idx "
                    "indexes GEARS's GO-graph gene list; pass that list as pert_names."
                )

    extras_per_row = []
    flags = np.zeros((batch, n_genes), np.float32)
    unmeasured = set()
    for row, genes in enumerate(genes_per_row):
        extra = []
        for gene in genes:
            if gene in column_of:
                flags[row, column_of[gene]] = 1.0
                continue
            if vocab is None or gene not in vocab:
                raise ValueError(
                    f"Unknown gene {gene!r} in condition {pert[row]!r}: it is not among the "
                    "expression genes"
                    + (
                        " and has no token in vocab"
                        if vocab is not None
                        else "; pass vocab (e.g. the PerturbData) so that "
                        "an unmeasured perturbed gene gets a token"
                    )
                    + "."
                )
            unmeasured.add(gene)
            extra.append(int(vocab[gene]))
        extras_per_row.append(extra)
    if unmeasured:
        warnings.warn(
            f"Perturbed gene(s) {sorted(unmeasured)} are not measured; they are added "
            "as extra tokens with flag 1 and expression 0.",
            stacklevel=2,
        )
    if x.shape[1] == 2:
        old_flags = x[:, 1].reshape(batch, n_genes)
        disagree = int(np.sum(np.any((old_flags != 0) != (flags != 0), axis=1)))
        if disagree:
            warnings.warn(
                f"x[:, 1] disagrees with the condition names in {disagree} of {batch} "
                "cells; the flags follow the condition names.",
                stacklevel=2,
            )

    length = n_genes + max(len(e) for e in extras_per_row)
    gene_ids = np.full((batch, length), pad_token_id, np.int64)
    values = np.full((batch, length), pad_value, np.float32)
    targets = np.full((batch, length), pad_value, np.float32)
    pert_flags = np.full((batch, length), pert_pad_id, np.float32)
    padding = np.ones((batch, length), bool)
    gene_ids[:, :n_genes] = token_of_column
    values[:, :n_genes] = control_values
    targets[:, :n_genes] = y
    pert_flags[:, :n_genes] = flags
    padding[:, :n_genes] = False
    for row, extra in enumerate(extras_per_row):
        span = slice(n_genes, n_genes + len(extra))
        gene_ids[row, span] = extra
        values[row, span] = 0.0
        targets[row, span] = 0.0
        pert_flags[row, span] = 1.0
        padding[row, span] = False
    # Only measured columns have a target; the extra tokens of unmeasured genes do not.
    target_mask = np.zeros((batch, length), bool)
    target_mask[:, :n_genes] = True
    return PerturbBatch.from_arrays(
        gene_ids=gene_ids,
        control_values=values,
        pert_flags=pert_flags,
        target_values=targets,
        padding_mask=padding,
        labels=labels,
        target_mask=target_mask,
    )
