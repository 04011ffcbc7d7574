"""Predict the expression of cells under any perturbation, seen or not.

``predict(...)`` samples a pool of control cells, sets the perturbation flags of the
requested genes and runs the model in eval mode, returning the mean and per-cell
predictions as AnnData (``obs['condition']``).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Sequence

import anndata
import jax
import numpy as np
import pandas as pd

from scformer_jax.config import ModelConfig
from scformer_jax.data.batching import HostBatch, assemble_batch, bucket_sizes
from scformer_jax.data.conditions import CONTROL, condition_genes
from scformer_jax.data.dataset import PerturbData
from scformer_jax.model import TransformerGenerator
from scformer_jax.objectives import predict_expression
from scformer_jax.prior import AdditivePrior, prior_for, uses_prior
from scformer_jax.runs import Run, load_run


class UnknownPerturbationError(ValueError):
    """A requested perturbation names a gene the model has no token for."""


def normalize_perturbation(text: str, dataset: PerturbData) -> str:
    """``"A"``, ``"A+ctrl"``, ``"ctrl+A"``, ``"A+B"`` -> the dataset's condition spelling.

    A double is written as the dataset writes it when it holds that pair in either order.

    Raises:
      UnknownPerturbationError: a gene without a token, with close matches.
    """
    text = str(text).strip()
    if text == CONTROL:
        return CONTROL
    try:
        genes = list(condition_genes(text))
    except ValueError as e:
        raise UnknownPerturbationError(
            f"Perturbation {text!r} is malformed ({e}): write one gene ('A' or 'A+ctrl'), two "
            "genes ('A+B') or 'ctrl'."
        ) from None
    known = [name for name in dataset.vocab if not name.startswith("<")]
    for gene in genes:
        if gene not in dataset.vocab or gene.startswith("<"):
            close = difflib.get_close_matches(gene, known, n=5, cutoff=0.6)
            hint = f" Close matches: {close}." if close else ""
            raise UnknownPerturbationError(
                f"Unknown gene {gene!r} in perturbation {text!r}: the model has no token for it "
                f"(it is neither a measured gene nor a perturbed gene of {dataset.name!r}).{hint}"
            )
    if len(genes) == 1:
        return f"{genes[0]}+ctrl"
    a, b = genes
    for candidate in (f"{a}+{b}", f"{b}+{a}"):
        if candidate in dataset.condition_cells:
            return candidate
    return f"{a}+{b}"


def full_profiles(
    control_rows: np.ndarray, token_pred: np.ndarray, gene_index: np.ndarray
) -> np.ndarray:
    """Per-token predictions -> whole-gene profiles.

    Args:
      control_rows: (n, n_genes) expression of each row's control cell.
      token_pred: (>= n, seq_len) predicted expression of each input token.
      gene_index: (>= n, seq_len) expression column of each token, -1 for padding and
        unmeasured genes.

    Returns:
      float64 (n, n_genes): the control rows with the predicted genes written in; genes that
      are not input tokens keep their control value (0 for those the non-`all` modes leave out).
    """
    out = np.array(control_rows, dtype=np.float64)
    for row in range(out.shape[0]):
        keep = gene_index[row] >= 0
        out[row, gene_index[row][keep]] = token_pred[row][keep]
    return out


class Predictor:
    """A trained model bound to a dataset's vocabulary, predicting full gene profiles."""

    def __init__(
        self,
        model_config: ModelConfig,
        params: Any,
        dataset: PerturbData,
        *,
        batch_size: int = 32,
        include_zero_gene: str = "all",
        prior: AdditivePrior | None = None,
    ):
        if uses_prior(model_config) and prior is None:
            option = next(
                (
                    f"model.{k}"
                    for k in ("additive_prior", "seen_single_correction", "coexpression_prior")
                    if getattr(model_config, k)
                ),
                "model.unseen_single",
            )
            raise ValueError(
                "This model's predictions use the measured training singles "
                f"({option}): pass prior=fit_additive_prior(dataset, split['train']) with the "
                "run's training split."
            )
        self.prior = prior if uses_prior(model_config) else None
        self.model_config = model_config
        self.params = params
        self.dataset = dataset
        self.batch_size = batch_size
        self.include_zero_gene = include_zero_gene
        # A few fixed lengths, so the model compiles a few times, not once per batch.
        self._buckets = bucket_sizes(dataset.n_genes + 2)
        model = TransformerGenerator(model_config)
        self._predict = jax.jit(lambda p, b, k: predict_expression(model, p, b, k))
        # model.sample_zero_prob draws anew for every batch, reproducibly per Predictor.
        self._batches_run = 0

    def _run(self, host: HostBatch, control_rows: np.ndarray) -> np.ndarray:
        key = jax.random.fold_in(jax.random.PRNGKey(0), self._batches_run)
        self._batches_run += 1
        pred = np.asarray(self._predict(self.params, host.batch, key))
        return full_profiles(control_rows, pred, host.gene_index).astype(np.float32)

    def predict_cells(self, condition: str, control_cells: np.ndarray) -> np.ndarray:
        """(n, n_genes) predicted profiles of `control_cells` under `condition`."""
        if self._unseen_single_gene(condition) is not None:
            # The network's output for the condition itself is not used: skip computing it.
            unperturbed = self._model_cells(CONTROL, control_cells)
            return self._unseen_single_cells(
                condition, control_cells, unperturbed
            ) + self._control_anchor(condition, control_cells, unperturbed)
        if self._priors_only(condition):
            return self._priors_cells(condition, len(control_cells))
        network_cells = self._model_cells(condition, control_cells)
        return network_cells + self.prior_part(condition, control_cells, network_cells)

    def _priors_only(self, condition: str) -> bool:
        """Whether `condition` is predicted from the priors alone, without the network: under
        ``model.unseen_single: no_network`` a single of a measured gene with a co-expression
        prior and no training single; under ``model.unseen_in_combo: no_network`` a
        multi-gene condition each of whose genes has a measured training single or a
        co-expression prior, one at least without a single."""
        if self.prior is None:
            return False
        genes = condition_genes(condition)
        if len(genes) == 1:
            return self.model_config.unseen_single == "no_network" and self._prior_only(genes[0])
        if self.model_config.unseen_in_combo != "no_network":
            return False
        if len(genes) < 2 or not any(self._prior_only(g) for g in genes):
            return False
        return all(g in self.prior.changes or self._prior_only(g) for g in genes)

    def _priors_cells(self, condition: str, n_cells: int) -> np.ndarray:
        """(n_cells, n_genes) a condition predicted from the priors alone (:meth:`_priors_only`):
        the control mean plus the condition's measured singles' changes (shrunk under
        ``model.shrink_singles``) plus the co-expression prior of its other genes, the same
        for every cell."""
        n_genes = self.dataset.n_genes
        profile = np.asarray(self.dataset.control_mean, np.float32).copy()
        for gene in condition_genes(condition):
            if gene in self.prior.changes:
                profile += self.prior.changes[gene]
            else:
                profile += self.prior.effect_offset(f"{gene}+ctrl", n_genes)
        return np.broadcast_to(profile, (n_cells, n_genes)).copy()

    def _unseen_single_gene(self, condition: str) -> str | None:
        """The gene of a single perturbation predicted from the co-expression prior instead of
        the network's output for it (``model.unseen_single: prior``: a measured gene without a
        training single), else None."""
        if self.prior is None or self.model_config.unseen_single != "prior":
            return None
        genes = condition_genes(condition)
        if len(genes) != 1 or not self._prior_only(genes[0]):
            return None  # measured in training, or no co-expression prior: the network
        return genes[0]

    def _stand_in_genes(self, condition: str) -> list[str]:
        """The genes of a multi-gene `condition` whose single the co-expression prior stands
        in for (``model.unseen_in_combo: prior``)."""
        if self.prior is None or self.model_config.unseen_in_combo != "prior":
            return []
        genes = condition_genes(condition)
        return [g for g in genes if self._prior_only(g)] if len(genes) > 1 else []

    def _prior_only(self, gene: str) -> bool:
        """Whether `gene` is measured, has a co-expression prior and no training single: what
        ``model.unseen_single`` and ``model.unseen_in_combo`` can predict from the prior."""
        coexpression = self.prior.coexpression
        return (
            gene not in self.prior.changes
            and coexpression is not None
            and gene in coexpression.columns
        )

    def _unseen_single_cells(
        self,
        condition: str,
        control_cells: np.ndarray,
        unperturbed: np.ndarray | None = None,
    ) -> np.ndarray:
        """``model.unseen_single: prior``: the model's prediction of each control cell
        unperturbed (`unperturbed` when the caller has it) plus the condition's
        co-expression prior."""
        if unperturbed is None:
            unperturbed = self._model_cells(CONTROL, control_cells)
        return unperturbed + self.prior.effect_offset(condition, self.dataset.n_genes)

    def _network_outputs(self, condition: str) -> int:
        """How many times the network's output enters the prediction of `condition`, with
        its sign: once for the condition itself (for an unseen single under
        ``model.unseen_single: prior``: the unperturbed prediction in its place), minus once
        per measured single of a double under ``model.seen_single_correction``, plus once per
        unmeasured single of a double under ``model.additive_prior`` (a gene that
        ``model.unseen_in_combo: prior`` stands in for adds the unperturbed prediction and
        takes off its single's output: no change); none for a condition that
        ``model.unseen_single: no_network`` or ``model.unseen_in_combo: no_network`` predicts
        from the priors alone."""
        if self._priors_only(condition):
            return 0
        if self._unseen_single_gene(condition) is not None or self.prior is None:
            return 1
        genes = condition_genes(condition)
        if len(genes) < 2:
            return 1
        if self.model_config.seen_single_correction:
            return 1 - sum(gene in self.prior.changes for gene in genes)
        if self.model_config.additive_prior:
            return 1 + sum(gene not in self.prior.changes for gene in genes)
        return 1

    def _control_anchor(
        self,
        condition: str,
        control_cells: np.ndarray,
        unperturbed: np.ndarray | None = None,
    ) -> np.ndarray:
        """float32 (n_genes,) ``model.control_anchor``: what sets the prediction on the
        control mean, ``-k * (mean of the network's unperturbed prediction of control_cells
        - control mean)`` with k from :meth:`_network_outputs`; every network output then
        counts as its change over the network's own prediction of the same cells
        unperturbed. `unperturbed`: that prediction, when the caller has it. Zeros when the
        option is off."""
        n_genes = self.dataset.n_genes
        if not self.model_config.control_anchor or len(control_cells) == 0:
            return np.zeros(n_genes, np.float32)
        k = self._network_outputs(condition)
        if k == 0:
            return np.zeros(n_genes, np.float32)
        if unperturbed is None:
            unperturbed = self._model_cells(CONTROL, control_cells)
        drift = unperturbed.mean(axis=0, dtype=np.float64) - self.dataset.control_mean
        return (-k * drift).astype(np.float32)

    def prior_part(
        self,
        condition: str,
        control_cells: np.ndarray,
        network_cells: np.ndarray | None = None,
    ) -> np.ndarray:
        """(n, n_genes) what the priors add to the network's output for `condition` on each
        control cell: the co-expression prior (``model.coexpression_prior``) and, for
        multi-gene conditions, the additive prior (``model.additive_prior``) or the
        correction by the model's errors on the measured singles
        (``model.seen_single_correction``), and the control anchor
        (``model.control_anchor``), and with ``model.unseen_in_combo: prior`` what takes the
        network's guess for a double's unseen genes out; zeros without any. A condition that
        ``model.unseen_single: no_network`` or ``model.unseen_in_combo: no_network`` predicts
        from the priors alone: that prediction minus the network's output. With
        ``model.unseen_single: prior``,
        for a single of a measured gene without a training single: its prediction minus the
        network's output, which `network_cells` ((n, n_genes), e.g. from a validation pass)
        gives when the caller has it, else computed here."""
        n_genes = self.dataset.n_genes
        if self._priors_only(condition):
            # In place of the network's output (model.unseen_single / unseen_in_combo:
            # no_network).
            if network_cells is None:
                network_cells = self._model_cells(condition, control_cells)
            return self._priors_cells(condition, len(control_cells)) - network_cells
        if self._unseen_single_gene(condition) is not None:
            # In place of the network's output (model.unseen_single: prior).
            if network_cells is None:
                network_cells = self._model_cells(condition, control_cells)
            unperturbed = self._model_cells(CONTROL, control_cells)
            return (
                self._unseen_single_cells(condition, control_cells, unperturbed)
                + self._control_anchor(condition, control_cells, unperturbed)
                - network_cells
            )
        out = np.zeros((len(control_cells), n_genes), np.float32)
        unperturbed = network_cells if condition == CONTROL else None
        out += self._control_anchor(condition, control_cells, unperturbed)
        if self.prior is None:
            return out
        out += self.prior.effect_offset(condition, n_genes)
        if len(condition_genes(condition)) < 2:
            return out
        if self.model_config.seen_single_correction:
            ctrl = np.asarray(self.dataset.control_mean, np.float32)
            for gene in condition_genes(condition):
                if gene in self.prior.changes:
                    out += ctrl + self.prior.changes[gene] - self._single_cells(gene, control_cells)
            stand_ins = self._stand_in_genes(condition)
            if stand_ins:
                # model.unseen_in_combo: prior. The unseen gene's single as unseen_single:
                # prior predicts it (the unperturbed prediction plus its co-expression prior)
                # minus the model's prediction of that single (the network's output plus the
                # same prior): the network's guess for the gene is taken out of the combination.
                unperturbed_cells = self._model_cells(CONTROL, control_cells)
                for gene in stand_ins:
                    out += unperturbed_cells - self._model_cells(f"{gene}+ctrl", control_cells)
        elif self.model_config.additive_prior:
            offset, missing = self.prior.parts(condition, n_genes)
            out += offset
            if missing:
                controls = self.dataset.dense_rows(np.asarray(control_cells, np.int64))
                for gene in missing:
                    out += self._single_cells(gene, control_cells) - controls
        return out

    def _single_cells(self, gene: str, control_cells: np.ndarray) -> np.ndarray:
        """The model's prediction of the single `gene` (the network and the co-expression
        prior)."""
        single = f"{gene}+ctrl"
        return self._model_cells(single, control_cells) + self.prior.effect_offset(
            single, self.dataset.n_genes
        )

    def _model_cells(self, condition: str, control_cells: np.ndarray) -> np.ndarray:
        results = []
        for start in range(0, len(control_cells), self.batch_size):
            chunk = np.asarray(control_cells[start : start + self.batch_size], dtype=np.int64)
            host = assemble_batch(
                self.dataset,
                chunk,
                chunk,
                conditions=[condition] * len(chunk),
                include_zero_gene=self.include_zero_gene,
                max_seq_len=None,
                batch_size=self.batch_size,
                pad_value=self.model_config.pad_value,
                pert_pad_id=self.model_config.pert_pad_id,
                bucket_sizes=self._buckets,
            )
            results.append(self._run(host, self.dataset.dense_rows(chunk)))
        return np.concatenate(results) if results else np.zeros((0, self.dataset.n_genes))

    def check_perturbations(self, perturbations: Sequence[str]) -> list[str]:
        """The dataset's spelling of each perturbation; raises
        :class:`UnknownPerturbationError` on the first bad one, before any model work."""
        if isinstance(perturbations, str):
            perturbations = [perturbations]
        return [normalize_perturbation(p, self.dataset) for p in perturbations]

    def predict(
        self,
        perturbations: Sequence[str],
        *,
        pool_size: int = 300,
        seed: int = 0,
        return_cells: bool = True,
    ) -> "Prediction":
        """Predicts each perturbation on a pool of control cells.

        Args:
          perturbations: e.g. ``["FOXA1", "KLF1+MAP2K6", "CEBPE+ctrl"]``; unseen genes and
            combinations are fine as long as the genes have tokens.
          pool_size: control cells to sample (all when fewer); the same pool for every
            perturbation, so differences between perturbations are not sampling noise.
          seed: the pool's seed.
          return_cells: also return the per-cell predictions.

        Returns:
          :class:`Prediction` with ``mean`` (one row per perturbation) and ``cells``.
        """
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}.")
        conditions = self.check_perturbations(perturbations)
        rng = np.random.default_rng(seed)
        controls = self.dataset.control_cells
        pool = np.sort(rng.choice(controls, size=min(pool_size, len(controls)), replace=False))
        means, cells, cell_obs = [], [], []
        for condition in conditions:
            pred = self.predict_cells(condition, pool)
            means.append(pred.mean(axis=0))
            if return_cells:
                cells.append(pred)
                cell_obs.append(pd.DataFrame({"condition": condition, "control_cell": pool}))
        var = pd.DataFrame(index=pd.Index(self.dataset.gene_names.astype(str), name="gene_name"))
        mean = anndata.AnnData(
            X=np.stack(means).astype(np.float32) if means else np.zeros((0, len(var)), np.float32),
            obs=pd.DataFrame(
                {"condition": conditions, "n_control_cells": len(pool)},
                index=[str(i) for i in range(len(conditions))],
            ),
            var=var.copy(),
        )
        cell_data = None
        if return_cells:
            obs = (
                pd.concat(cell_obs, ignore_index=True)
                if cell_obs
                else pd.DataFrame({"condition": [], "control_cell": []})
            )
            obs.index = obs.index.astype(str)
            cell_data = anndata.AnnData(
                X=np.concatenate(cells).astype(np.float32)
                if cells
                else np.zeros((0, len(var)), np.float32),
                obs=obs,
                var=var.copy(),
            )
        return Prediction(mean=mean, cells=cell_data)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """``mean``: AnnData, one row per perturbation (obs 'condition');
    ``cells``: AnnData, one row per (perturbation, control cell), or None."""

    mean: anndata.AnnData
    cells: anndata.AnnData | None


def predict(
    model_config: ModelConfig,
    params: Any,
    dataset: PerturbData,
    perturbations: Sequence[str],
    *,
    pool_size: int = 300,
    seed: int = 0,
    batch_size: int = 32,
    include_zero_gene: str = "all",
    return_cells: bool = True,
    prior: AdditivePrior | None = None,
) -> Prediction:
    """Functional form of :meth:`Predictor.predict`."""
    return Predictor(
        model_config,
        params,
        dataset,
        batch_size=batch_size,
        include_zero_gene=include_zero_gene,
        prior=prior,
    ).predict(perturbations, pool_size=pool_size, seed=seed, return_cells=return_cells)


def run_predictor(run: Run, *, batch_size: int | None = None) -> Predictor:
    """A :class:`Predictor` for a loaded run folder (:func:`scformer_jax.runs.load_run`):
    its model on its dataset, with the priors (:mod:`scformer_jax.prior`) fitted on its
    training split when the model uses them.

    Args:
      run: the loaded run.
      batch_size: prediction batch (default: the run's ``train.eval_batch_size``).
    """
    prior = (
        prior_for(
            run.model_config,
            run.dataset,
            run.split["train"],
            measured=run.training_measurements(singles_only=True),
        )
        if uses_prior(run.model_config)
        else None
    )
    return Predictor(
        run.model_config,
        run.params,
        run.dataset,
        batch_size=batch_size or run.config.train.eval_batch_size,
        include_zero_gene=run.config.data.include_zero_gene,
        prior=prior,
    )


def load_predictor(workdir: str, *, which: str = "best", batch_size: int = 32) -> Predictor:
    """A :class:`Predictor` from a run folder written by ``train.py`` or a folder written by
    ``python -m scformer_jax.convert``."""
    return run_predictor(load_run(workdir, which=which), batch_size=batch_size)
