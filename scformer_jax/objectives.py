"""The training objective of the perturbation model: the enabled losses, combined by name.

:func:`loss_terms` runs the model (twice when CCE is on: two dropout passes) and returns every
enabled objective as a ``(numerator, denominator)`` pair; :func:`objective_value` reduces the
denominators across devices first and combines the losses with the config's named weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from scformer_jax import losses
from scformer_jax.batch import PerturbBatch
from scformer_jax.config import ObjectiveConfig
from scformer_jax.model import BATCH_STATS, TransformerGenerator, model_variables


def loss_terms(
    model: TransformerGenerator,
    params: Any,
    batch: PerturbBatch,
    dropout_rng,
    objective: ObjectiveConfig,
    *,
    deterministic: bool = False,
    axis_name: str | None = None,
):
    """Runs the model and returns ``{name: (numerator, denominator)}`` and the outputs.

    Names: ``mse`` and ``mre`` (metric only) always; ``cls``, ``cce``, ``mvc``, ``ecs`` when
    enabled in ``objective``. A training pass of a model with running statistics
    (``model.input_batchnorm``) also returns their update as ``out["batch_stats"]``.
    """
    batch.check()
    rng_a, rng_b = jax.random.split(dropout_rng)
    variables = model_variables(params)
    update_stats = not deterministic and BATCH_STATS in variables
    out = model.apply(
        variables,
        batch.gene_ids,
        batch.inputs,
        batch.padding_mask,
        deterministic=deterministic,
        compute_cls=objective.cls,
        compute_mvc=objective.mvc,
        rngs={"dropout": rng_a, "sample": rng_b},
        mutable=[BATCH_STATS] if update_stats else False,
    )
    if update_stats:
        out, updates = out
        out = {**out, BATCH_STATS: updates[BATCH_STATS]}
    mask = batch.loss_mask
    terms = {
        "mse": losses.masked_mse_terms(out["mlm_output"], batch.target_values, mask),
        "mre": losses.masked_relative_error_terms(out["mlm_output"], batch.target_values, mask),
    }
    weights = batch.cell_weights
    if objective.cls:
        terms["cls"] = losses.classification_terms(out["cls_output"], batch.labels, weights=weights)
    if objective.cce:
        # SimCSE: the same cells through a second dropout pass are the positives.
        second = model.apply(
            variables,
            batch.gene_ids,
            batch.inputs,
            batch.padding_mask,
            deterministic=deterministic,
            rngs={"dropout": rng_b},
        )
        terms["cce"] = losses.contrastive_cell_embedding_terms(
            out["cell_emb"],
            second["cell_emb"],
            temperature=objective.cce_temperature,
            axis_name=axis_name,
            weights=weights,
        )
    if objective.mvc:
        terms["mvc"] = losses.masked_mse_terms(out["mvc_output"], batch.target_values, mask)
    if objective.ecs:
        terms["ecs"] = losses.elastic_cell_similarity_terms(
            out["cell_emb"],
            ecs_threshold=objective.ecs_threshold,
            axis_name=axis_name,
            weights=weights,
        )
    return terms, out


def objective_value(terms, objective: ObjectiveConfig, *, axis_name: str | None = None):
    """Turns terms into the scalar to differentiate and the metrics to log.

    With ``axis_name``, each loss is ``n_devices * local_numerator / global_denominator``, so
    that ``lax.pmean`` of the per-device gradients is the gradient of the global-batch loss.

    Returns:
      (loss, metrics): ``loss`` the weighted sum for this device; ``metrics`` the global value
      of every term (identical on every device) and ``loss`` itself.
    """
    values, metrics = {}, {}
    n_dev = 1 if axis_name is None else jax.lax.psum(1, axis_name)
    for name, (num, den) in terms.items():
        den = jax.lax.stop_gradient(den)
        if axis_name is not None:
            den = jax.lax.psum(den, axis_name)
        values[name] = losses.safe_divide(num * n_dev, den)
        global_num = jax.lax.stop_gradient(num)
        if axis_name is not None:
            global_num = jax.lax.psum(global_num, axis_name)
        metrics[name] = losses.safe_divide(global_num, den)
    weights = objective.weights()
    loss = losses.combine_losses({k: v for k, v in values.items() if k in weights}, weights)
    metrics["loss"] = losses.combine_losses(
        {k: v for k, v in metrics.items() if k in weights}, weights
    )
    return loss, metrics


def predict_expression(model: TransformerGenerator, params: Any, batch: PerturbBatch, rng=None):
    """Eval-mode predicted expression of every input token, (batch, seq_len).

    ``rng``: the key of ``model.sample_zero_prob``'s draws (default PRNGKey(0))."""
    out = model.apply(
        model_variables(params),
        batch.gene_ids,
        batch.inputs,
        batch.padding_mask,
        deterministic=True,
        rngs={"sample": jax.random.PRNGKey(0) if rng is None else rng},
    )
    return jnp.where(batch.padding_mask, 0.0, out["mlm_output"])
