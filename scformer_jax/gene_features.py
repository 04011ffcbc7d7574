"""Gene embeddings initialised from the training data alone.

A gene that was never perturbed in training has, in a randomly initialised model, nothing
that tells the model what perturbing it would do. Two views of the data place genes that
act alike next to each other, without any outside knowledge:

* **control co-expression**: the principal components of the control cells' standardised
  expression (cells x genes); a gene's loadings describe which genes it co-varies with. In a
  regulatory network, intrinsic noise in a regulator propagates to its targets, so a gene's
  co-variation in unperturbed cells resembles the response to perturbing it.
* **training perturbation profiles**: the principal components of the training
  perturbations' mean changes over control (genes x perturbations), the gene embedding of
  the linear baseline of Ahlmann-Eltze et al. (Nat Methods 2025).

:func:`data_gene_embedding` stacks the two (half of the dimensions each) into a table over
the model's vocabulary; tokens without expression (unmeasured perturbed genes, special
tokens) keep their random rows.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from scformer_jax.data.conditions import condition_genes

# Control cells used for the co-expression PCA (a random subset above this).
MAX_CONTROL_CELLS = 20_000


# Above this smaller side, the top components come from a randomized SVD.
EXACT_SVD_MAX = 1500


def top_components(
    matrix: np.ndarray, k: int, *, seed: int = 0, exact_max: int | None = None
) -> np.ndarray:
    """(n_rows, k) row coordinates ``U * S`` of the top-k principal axes of a centred matrix,
    zero-filled when the matrix has rank below k.

    Matrices whose smaller side exceeds `exact_max` (default :data:`EXACT_SVD_MAX`; e.g. 20k
    control cells x 5k genes) use a randomized SVD (Halko et al. 2011: a Gaussian sketch with
    10 extra columns and 4 power iterations), which recovers the leading components, the only
    ones kept, at a small fraction of the cost; smaller ones an exact SVD.
    """
    out = np.zeros((matrix.shape[0], k), np.float64)
    if k == 0 or min(matrix.shape) == 0:
        return out
    if min(matrix.shape) <= (EXACT_SVD_MAX if exact_max is None else exact_max):
        u, s, _ = np.linalg.svd(matrix, full_matrices=False)
    else:
        rng = np.random.default_rng(seed)
        sketch = min(k + 10, min(matrix.shape))
        q, _ = np.linalg.qr(matrix @ rng.standard_normal((matrix.shape[1], sketch)))
        for _ in range(4):
            q, _ = np.linalg.qr(matrix.T @ q)
            q, _ = np.linalg.qr(matrix @ q)
        u_small, s, _ = np.linalg.svd(q.T @ matrix, full_matrices=False)
        u = q @ u_small
    r = min(k, len(s))
    out[:, :r] = u[:, :r] * s[:r]
    return out


def _unit_rms(block: np.ndarray) -> np.ndarray:
    rms = float(np.sqrt(np.mean(block**2))) if block.size else 0.0
    return block / rms if rms > 0 else block


def data_gene_embedding(
    dataset,
    train_conditions: Sequence[str],
    dim: int,
    *,
    seed: int = 0,
    profiles: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Per-gene features from the control cells and the training perturbations.

    Args:
      dataset: a :class:`scformer_jax.data.dataset.PerturbData`.
      train_conditions: the training split's conditions (test data is never read).
      dim: feature dimension (the model's embsize).
      seed: draws the control-cell subset when there are more than ``MAX_CONTROL_CELLS``.
      profiles: training condition -> (n_genes,) mean expression, when the caller has
        measured them (:func:`scformer_jax.prior.measure_training`); others are read here.

    Returns:
      float32 (n_genes, dim): row i for expression column i (= token i); each half has unit
      root-mean-square over its entries.
    """
    if dim < 2:
        raise ValueError(f"data_gene_embedding needs dim >= 2, got {dim}.")
    k_ctrl = dim // 2
    k_pert = dim - k_ctrl
    rng = np.random.default_rng(seed)
    cells = dataset.control_cells
    if len(cells) > MAX_CONTROL_CELLS:
        cells = np.sort(rng.choice(cells, MAX_CONTROL_CELLS, replace=False))
    ctrl = dataset.dense_rows(cells).astype(np.float32)
    ctrl -= ctrl.mean(axis=0)
    sd = ctrl.std(axis=0)
    ctrl /= np.where(sd > 0, sd, 1.0)
    # Gene loadings: right singular vectors scaled by the singular values (the transpose view).
    ctrl_part = top_components(ctrl.T / np.sqrt(max(len(cells) - 1, 1)), k_ctrl, seed=seed)

    known = profiles or {}
    changes = [
        (known[c] if c in known else dataset.condition_mean(c)) - dataset.control_mean
        for c in dict.fromkeys(train_conditions)
        if condition_genes(c)
    ]
    if changes:
        profiles = np.stack(changes, axis=1).astype(np.float64)  # (n_genes, n_perts)
        pert_part = top_components(profiles - profiles.mean(axis=1, keepdims=True), k_pert)
    else:
        pert_part = np.zeros((dataset.n_genes, k_pert))
    return np.concatenate([_unit_rms(ctrl_part), _unit_rms(pert_part)], axis=1).astype(np.float32)


def init_from_data(
    params: Any,
    model_config,
    dataset,
    train_conditions: Sequence[str],
    *,
    seed: int = 0,
    embedding: bool = True,
    profiles: Mapping[str, np.ndarray] | None = None,
) -> Any:
    """``params`` with the data-initialised parts the config asks for: the gene embedding
    (``gene_embedding_init: data``, unless ``embedding`` is False, e.g. when it comes from a
    pretrained checkpoint) and the per-gene output baseline (``output_baseline:
    gene_mean``: the control cells' mean expression of each measured gene, 0 elsewhere).
    `profiles`: as :func:`data_gene_embedding`'s."""
    if embedding and model_config.gene_embedding_init == "data":
        params = init_gene_embedding_from_data(
            params, dataset, train_conditions, seed=seed, profiles=profiles
        )
    if model_config.output_baseline == "gene_mean":
        baseline = np.zeros(np.shape(params["gene_baseline"]), np.float32)
        baseline[np.asarray(dataset.gene_token_ids, np.int64)] = dataset.control_mean
        params = dict(params, gene_baseline=baseline)
    return params


def init_gene_embedding_from_data(
    params: Any,
    dataset,
    train_conditions: Sequence[str],
    *,
    scale: float = 0.1,
    seed: int = 0,
    profiles: Mapping[str, np.ndarray] | None = None,
) -> Any:
    """``params`` with the measured genes' rows of the gene embedding (``encoder``) replaced
    by :func:`data_gene_embedding`, scaled to root-mean-square ``scale / sqrt(3)`` (the
    random rows' uniform(-scale, scale) spread)."""
    table = np.asarray(params["encoder"]["embedding"])
    features = data_gene_embedding(
        dataset, train_conditions, table.shape[1], seed=seed, profiles=profiles
    )
    columns = np.asarray(dataset.gene_token_ids, np.int64)
    table = table.copy()
    table[columns] = features * (scale / np.sqrt(3.0))
    new = dict(params)
    new["encoder"] = dict(params["encoder"], embedding=table)
    return new
