"""The prediction-quality options: each changes what it should and nothing else."""

import copy
import dataclasses

import jax
import numpy as np
import pytest

from scformer_jax import ModelConfig, TransformerGenerator, init_params
from scformer_jax.config import ConfigError, load_config
from scformer_jax.data.batching import BatchLoader
from scformer_jax.data.splits import gears_split
from scformer_jax.gene_features import data_gene_embedding, init_gene_embedding_from_data
from tests.test_model import TINY
from tests.tiny_model import make_inputs


def test_output_baselines_add_the_control_input_or_the_gene_baseline():
    base = ModelConfig(**TINY)
    gene_ids, inputs, padding = make_inputs()
    for prepend in (True, False):
        plain = dataclasses.replace(base, prepend_cls_token=prepend)
        params = init_params(
            dataclasses.replace(plain, output_baseline="gene_mean"), jax.random.PRNGKey(0)
        )
        baseline = np.random.default_rng(1).normal(size=base.ntoken).astype(np.float32)
        params = dict(params, gene_baseline=baseline)
        outputs = {}
        for mode in ("none", "control_input", "gene_mean"):
            config = dataclasses.replace(plain, output_baseline=mode)
            outputs[mode] = np.asarray(
                TransformerGenerator(config).apply({"params": params}, gene_ids, inputs, padding)[
                    "mlm_output"
                ]
            )
        np.testing.assert_allclose(
            outputs["control_input"] - outputs["none"], inputs[..., 0], atol=1e-5
        )
        np.testing.assert_allclose(
            outputs["gene_mean"] - outputs["none"], baseline[gene_ids], atol=1e-5
        )


def test_condition_mean_target_replaces_each_cell_by_its_condition_mean(data_tiny):
    conditions = [c for c in data_tiny.conditions][:6]
    cell = BatchLoader(data_tiny, conditions, batch_size=16, seed=3)
    mean = BatchLoader(data_tiny, conditions, batch_size=16, seed=3, target="condition_mean")
    X = data_tiny.X.toarray()
    for host_cell, host_mean in zip(cell.epoch(0), mean.epoch(0)):
        # Same cells, pairs, tokens and inputs: only the target differs.
        np.testing.assert_array_equal(host_cell.cell_indices, host_mean.cell_indices)
        np.testing.assert_array_equal(host_cell.batch.inputs, host_mean.batch.inputs)
        for r in range(host_mean.n_real):
            cond = host_mean.conditions[r]
            truth = X[data_tiny.condition_cells[cond]].mean(axis=0)
            real = host_mean.gene_index[r] >= 0
            np.testing.assert_allclose(
                host_mean.batch.target_values[r, real],
                truth[host_mean.gene_index[r, real]],
                rtol=1e-5,
                atol=1e-6,
            )
        assert not np.allclose(host_cell.batch.target_values, host_mean.batch.target_values)
    with pytest.raises(ValueError, match="target"):
        BatchLoader(data_tiny, conditions, batch_size=16, target="mean")


def test_data_gene_embedding_reads_only_the_training_data(data_tiny):
    split = gears_split(data_tiny.conditions, split="simulation", seed=1)
    features = data_gene_embedding(data_tiny, split["train"], 8)
    assert features.shape == (data_tiny.n_genes, 8) and np.all(np.isfinite(features))
    np.testing.assert_allclose(np.sqrt(np.mean(features[:, :4] ** 2)), 1.0, rtol=1e-5)
    # Control half: the gene loadings of the control cells' standardised PCA, so their
    # inner products are the control correlations (up to the components kept).
    ctrl = data_tiny.dense_rows(data_tiny.control_cells).astype(np.float64)
    keep = ctrl.std(0) > 0
    corr = np.corrcoef(ctrl[:, keep].T)
    full = data_gene_embedding(data_tiny, split["train"], 2 * data_tiny.n_genes)
    half = full[:, : data_tiny.n_genes][keep]
    scale = np.sqrt(np.mean(np.diag(corr))) / np.sqrt(np.mean(np.diag(half @ half.T)))
    np.testing.assert_allclose((half * scale) @ (half * scale).T, corr, atol=1e-4)
    # Changing a test perturbation's cells does not change the features.
    test_cells = data_tiny.condition_cells[split["test"][0]]
    X = data_tiny.X.tolil(copy=True)
    X[test_cells] = 0.0
    other = copy.copy(data_tiny)
    other.X = X.tocsr()
    np.testing.assert_allclose(data_gene_embedding(other, split["train"], 8), features)


def test_init_from_data_sets_only_the_measured_gene_rows(data_tiny):
    config = ModelConfig(
        **{
            **TINY,
            "ntoken": data_tiny.n_tokens,
            "pad_token_id": data_tiny.pad_token_id,
            "cls_token_id": data_tiny.cls_token_id,
        }
    )
    params = init_params(config, jax.random.PRNGKey(0))
    split = gears_split(data_tiny.conditions, split="simulation", seed=1)
    new = init_gene_embedding_from_data(params, data_tiny, split["train"])
    old_table = np.asarray(params["encoder"]["embedding"])
    new_table = np.asarray(new["encoder"]["embedding"])
    genes = data_tiny.gene_token_ids
    others = np.setdiff1d(np.arange(data_tiny.n_tokens), genes)
    np.testing.assert_array_equal(new_table[others], old_table[others])
    assert not np.allclose(new_table[genes], old_table[genes])
    np.testing.assert_allclose(np.sqrt(np.mean(new_table[genes] ** 2)), 0.1 / np.sqrt(3), rtol=1e-4)
    # Everything but the gene embedding is untouched.
    flat_old = jax.tree_util.tree_leaves_with_path(params)
    flat_new = dict(jax.tree_util.tree_leaves_with_path(new))
    for path, leaf in flat_old:
        if "encoder" != getattr(path[0], "key", None):
            np.testing.assert_array_equal(np.asarray(flat_new[path]), np.asarray(leaf))


def test_config_keys_are_checked():
    with pytest.raises(ConfigError, match="gene_embedding_init"):
        load_config(None, ["model.gene_embedding_init=pca"])
    with pytest.raises(ConfigError, match="train_target"):
        load_config(None, ["data.train_target=bulk"])


def _tiny_model_config(data, **kw):
    return ModelConfig(
        **{
            **TINY,
            "ntoken": data.n_tokens,
            "pad_token_id": data.pad_token_id,
            "cls_token_id": data.cls_token_id,
            **kw,
        }
    )


def _predictor_pair(config, data, prior, changed_prior=None, **changed):
    """Two predictors on the same untrained parameters: `config` with `prior`, and `config`
    with the fields `changed` and `changed_prior` (default: `prior`; a config that uses no
    prior drops it). Returns (first, second, params)."""
    from scformer_jax.predict import Predictor

    params = init_params(config, jax.random.PRNGKey(0))
    first = Predictor(config, params, data, batch_size=8, prior=prior)
    other = prior if changed_prior is None else changed_prior
    second = Predictor(
        dataclasses.replace(config, **changed), params, data, batch_size=8, prior=other
    )
    return first, second, params


def _assert_same_predictions(first, second, conditions, controls):
    """The two predictors predict each condition alike on the given control cells."""
    for condition in conditions:
        np.testing.assert_allclose(
            first.predict_cells(condition, controls),
            second.predict_cells(condition, controls),
            atol=1e-6,
        )


def test_additive_prior_sums_the_measured_training_singles(data_tiny):
    from scformer_jax.prior import fit_additive_prior

    split = gears_split(data_tiny.conditions, split="simulation", seed=1)
    prior = fit_additive_prior(data_tiny, split["train"])
    ctrl = data_tiny.X[data_tiny.control_cells].toarray().mean(axis=0)
    train_singles = {
        c.split("+")[0]: c for c in split["train"] if c != "ctrl" and c.endswith("+ctrl")
    }
    assert set(prior.changes) == set(train_singles)
    for gene, cond in train_singles.items():
        truth = data_tiny.X[data_tiny.condition_cells[cond]].toarray().mean(axis=0) - ctrl
        np.testing.assert_allclose(prior.changes[gene], truth, atol=1e-5)
    seen = sorted(train_singles)
    offset, missing = prior.parts(f"{seen[0]}+{seen[1]}", data_tiny.n_genes)
    np.testing.assert_allclose(offset, prior.changes[seen[0]] + prior.changes[seen[1]])
    assert missing == ()
    unseen = next(
        g for c in split["test"] for g in data_tiny.condition_genes[c] if g not in prior.changes
    )
    offset, missing = prior.parts(f"{seen[0]}+{unseen}", data_tiny.n_genes)
    np.testing.assert_allclose(offset, prior.changes[seen[0]])
    assert missing == (unseen,)
    # Singles and the control are the model's alone.
    for cond in (f"{seen[0]}+ctrl", f"{unseen}+ctrl", "ctrl"):
        offset, missing = prior.parts(cond, data_tiny.n_genes)
        assert not offset.any() and missing == ()


def test_training_targets_of_doubles_lose_the_measured_part(data_tiny):
    from scformer_jax.prior import fit_additive_prior

    split = gears_split(data_tiny.conditions, split="simulation", seed=1)
    prior = fit_additive_prior(data_tiny, split["train"])
    conditions = split["train"]
    plain = BatchLoader(data_tiny, conditions, batch_size=16, seed=0)
    shifted = BatchLoader(
        data_tiny,
        conditions,
        batch_size=16,
        seed=0,
        target_offsets=prior.offsets(conditions, data_tiny.n_genes),
    )
    doubles = 0
    for a, b in zip(plain.epoch(0), shifted.epoch(0)):
        for r in range(a.n_real):
            cond = a.conditions[r]
            real = a.gene_index[r] >= 0
            expected = (
                a.batch.target_values[r, real]
                - prior.parts(cond, data_tiny.n_genes)[0][a.gene_index[r, real]]
            )
            np.testing.assert_allclose(b.batch.target_values[r, real], expected, atol=1e-6)
            doubles += len(data_tiny.condition_genes[cond]) == 2
    assert doubles > 0


def test_predictor_composes_doubles_from_prior_and_model(data_tiny):
    from scformer_jax.predict import Predictor
    from scformer_jax.prior import fit_additive_prior

    split = gears_split(data_tiny.conditions, split="simulation", seed=1)
    prior = fit_additive_prior(data_tiny, split["train"])
    config = _tiny_model_config(data_tiny, additive_prior=True, output_baseline="control_input")
    with_prior, plain, params = _predictor_pair(config, data_tiny, prior, additive_prior=False)
    with pytest.raises(ValueError, match="additive_prior"):
        Predictor(config, params, data_tiny)
    controls = data_tiny.control_cells[:5]
    x = data_tiny.X[controls].toarray()
    seen = sorted(prior.changes)
    unseen = next(
        g for c in split["test"] for g in data_tiny.condition_genes[c] if g not in prior.changes
    )
    double = f"{seen[0]}+{unseen}"
    expected = (
        plain.predict_cells(double, controls)
        + prior.changes[seen[0]]
        + plain.predict_cells(f"{unseen}+ctrl", controls)
        - x
    )
    np.testing.assert_allclose(with_prior.predict_cells(double, controls), expected, atol=1e-5)
    _assert_same_predictions(with_prior, plain, (f"{seen[1]}+ctrl",), controls)


def test_seen_single_correction_adds_the_models_errors_on_measured_singles(data_tiny):
    from scformer_jax.predict import Predictor
    from scformer_jax.prior import fit_additive_prior, prior_for

    split = gears_split(data_tiny.conditions, split="simulation", seed=1)
    config = _tiny_model_config(
        data_tiny, seen_single_correction=True, output_baseline="control_input"
    )
    prior = prior_for(config, data_tiny, split["train"])
    assert prior is not None and set(prior.changes) == set(
        fit_additive_prior(data_tiny, split["train"]).changes
    )
    assert (
        prior_for(
            dataclasses.replace(config, seen_single_correction=False), data_tiny, split["train"]
        )
        is None
    )
    corrected, plain, params = _predictor_pair(
        config, data_tiny, prior, seen_single_correction=False
    )
    with pytest.raises(ValueError, match="seen_single_correction"):
        Predictor(config, params, data_tiny)
    controls = data_tiny.control_cells[:5]
    ctrl = data_tiny.X[data_tiny.control_cells].toarray().mean(axis=0)
    seen = sorted(prior.changes)
    unseen = next(
        g for c in split["test"] for g in data_tiny.condition_genes[c] if g not in prior.changes
    )
    for double, measured in ((f"{seen[0]}+{seen[1]}", seen[:2]), (f"{seen[0]}+{unseen}", seen[:1])):
        expected = plain.predict_cells(double, controls) + sum(
            ctrl + prior.changes[g] - plain.predict_cells(f"{g}+ctrl", controls) for g in measured
        )
        np.testing.assert_allclose(corrected.predict_cells(double, controls), expected, atol=1e-4)
        assert not np.allclose(expected, plain.predict_cells(double, controls), atol=1e-3)
    # Singles and the control are the model's alone.
    _assert_same_predictions(
        corrected, plain, (f"{seen[1]}+ctrl", f"{unseen}+ctrl", "ctrl"), controls
    )
    with pytest.raises(ConfigError, match="seen_single_correction"):
        load_config(None, ["model.additive_prior=true", "model.seen_single_correction=true"])


def test_shrink_single_changes_is_the_per_gene_posterior_mean(monkeypatch):
    from scformer_jax import prior
    from scformer_jax.prior import shrink_single_changes

    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(12)]
    truth = rng.normal(size=(12, 7)) * np.array([0, 0, 0.1, 0.5, 1, 2, 0])
    se2 = rng.uniform(0.01, 0.2, size=(12, 7))
    se2[:, -1] = 0.0  # a gene measured without error (and no change): left as it is
    measured = truth + rng.normal(size=truth.shape) * np.sqrt(se2)
    shrunk = shrink_single_changes(dict(zip(genes, measured)), dict(zip(genes, se2)))
    for j in range(7):  # gene by gene, written out
        tau2 = max(np.mean(measured[:, j] ** 2) - np.mean(se2[:, j]), 0.0)
        for i, g in enumerate(genes):
            weight = 1.0 if tau2 + se2[i, j] == 0 else tau2 / (tau2 + se2[i, j])
            np.testing.assert_allclose(shrunk[g][j], weight * measured[i, j], rtol=1e-5, atol=1e-7)
    out = np.stack([shrunk[g] for g in genes])
    # Genes that do not change are pulled to (nearly) nothing, strong changes barely move,
    # and the shrunk changes are closer to the truth.
    assert np.abs(out[:, :2]).mean() < 0.5 * np.abs(measured[:, :2]).mean()
    np.testing.assert_allclose(out[:, 5], measured[:, 5], rtol=0.15)
    assert np.mean((out - truth) ** 2) < np.mean((measured - truth) ** 2)
    # Blocks of genes give the same numbers as one block.
    monkeypatch.setattr(prior, "SHRINK_BLOCK_GENES", 3)
    blocked = shrink_single_changes(dict(zip(genes, measured)), dict(zip(genes, se2)))
    for g in genes:
        np.testing.assert_array_equal(blocked[g], shrunk[g])
    with pytest.raises(ValueError, match="non-negative"):
        shrink_single_changes({"A": measured[0]}, {"A": -se2[0]})
    with pytest.raises(ValueError, match="same shape"):
        shrink_single_changes({"A": measured[0]}, {"A": se2[0, :3]})


def _mixture_posterior_reference(d, se2, spreads, iterations=3000, null_weight=10.0):
    """The mixture prior's weights by plain EM (explicit responsibilities) and each change's
    posterior mean, written out with normal densities (for changes with an error)."""

    def densities(x, v):
        var = spreads[None, :] ** 2 + v[:, None]
        return np.exp(-0.5 * x[:, None] ** 2 / var) / np.sqrt(2 * np.pi * var)

    x, v = d.ravel(), se2.ravel()
    fit = v > 0
    dens = densities(x[fit], v[fit])
    weights = np.full(len(spreads), 1 / len(spreads))
    pseudo = np.zeros(len(spreads))
    pseudo[0] = null_weight - 1
    for _ in range(iterations):
        resp = dens * weights / (dens * weights).sum(axis=1, keepdims=True)
        weights = (resp.sum(axis=0) + pseudo) / (fit.sum() + pseudo.sum())
    post = np.array(x)
    resp = dens * weights / (dens * weights).sum(axis=1, keepdims=True)
    shrink = spreads[None, :] ** 2 / (spreads[None, :] ** 2 + v[fit][:, None])
    post[fit] = (resp * shrink).sum(axis=1) * x[fit]
    return weights, post.reshape(d.shape)


def test_adaptive_shrinkage_is_the_mixture_posterior_mean_and_spares_large_changes(monkeypatch):
    from scformer_jax import prior
    from scformer_jax.prior import fit_adaptive_prior, shrink_single_changes

    rng = np.random.default_rng(3)
    n_singles, n_genes = 30, 8
    genes = [f"G{i}" for i in range(n_singles)]
    # Sparse effects: most (single, gene) changes are 0; a few singles move a gene a lot.
    truth = np.zeros((n_singles, n_genes))
    hits = rng.random(truth.shape) < 0.1
    truth[hits] = rng.choice([-3.0, 3.0], size=hits.sum())
    se2 = rng.uniform(0.02, 0.1, size=truth.shape)
    se2[:, -1] = 0.0  # measured without error: kept as it is
    measured = truth + rng.normal(size=truth.shape) * np.sqrt(se2)
    changes, errors = dict(zip(genes, measured)), dict(zip(genes, se2))

    spreads, weights = fit_adaptive_prior(changes, errors)
    assert spreads[0] == 0 and np.all(np.diff(spreads) > 0)
    assert spreads[1] == pytest.approx(np.sqrt(se2[se2 > 0].min()) / 10)
    assert spreads[-1] == pytest.approx(2 * np.sqrt(np.max(measured**2 - se2)))
    ref_weights, ref_post = _mixture_posterior_reference(measured, se2, spreads)
    np.testing.assert_allclose(weights, ref_weights, atol=2e-4)
    adaptive = np.stack(list(shrink_single_changes(changes, errors, prior="adaptive").values()))
    np.testing.assert_allclose(adaptive, ref_post, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(adaptive[:, -1], measured[:, -1].astype(np.float32))
    # Large changes keep nearly all of it; changes within their noise go near 0; the
    # per-gene normal prior shrinks a gene's rare large change as hard as its noise.
    large = hits & (se2 > 0)
    assert np.all(np.abs(adaptive[large]) > 0.95 * np.abs(measured[large]))
    null = ~hits & (se2 > 0)
    assert np.abs(adaptive[null]).mean() < 0.2 * np.abs(measured[null]).mean()
    normal = np.stack(list(shrink_single_changes(changes, errors).values()))
    assert np.mean((adaptive - truth) ** 2) < np.mean((normal - truth) ** 2)
    assert np.abs(adaptive[large]).mean() > np.abs(normal[large]).mean()
    # The fit reaches the penalised likelihood's maximum: no lower than long plain EM.
    likelihood = prior._component_likelihoods(measured[se2 > 0], se2[se2 > 0], spreads)
    pseudo = np.zeros(len(spreads))
    pseudo[0] = prior.ADAPTIVE_NULL_WEIGHT - 1

    def objective(w):
        return np.log(likelihood @ w).sum() + pseudo @ np.log(np.maximum(w, 1e-300))

    assert objective(weights) >= objective(ref_weights) - 1e-6
    # Fitting the weights on a subsample (genome-wide sizes) moves every shrunk change little
    # (weights half point mass, half the widest normal would move them by 0.2), whatever the
    # order of the singles.
    monkeypatch.setattr(prior, "ADAPTIVE_MAX_FIT", 120)
    sub = np.stack(list(shrink_single_changes(changes, errors, prior="adaptive").values()))
    np.testing.assert_allclose(sub, adaptive, atol=0.05)
    reordered = shrink_single_changes(dict(reversed(changes.items())), errors, prior="adaptive")
    np.testing.assert_array_equal(np.stack([reordered[g] for g in genes]), sub)
    # A grid longer than ADAPTIVE_MAX_COMPONENTS starts higher and still ends at the largest.
    monkeypatch.setattr(prior, "ADAPTIVE_MAX_COMPONENTS", 6)
    capped, _ = fit_adaptive_prior(changes, errors)
    assert len(capped) <= 6 and capped[0] == 0 and capped[-1] == pytest.approx(spreads[-1])
    with pytest.raises(ValueError, match="prior must be one of"):
        shrink_single_changes(changes, errors, prior="laplace")
    with pytest.raises(ValueError, match="'G1' is not finite"):
        shrink_single_changes({**changes, "G1": np.full(n_genes, np.nan)}, errors, prior="adaptive")
    # Without any error there is nothing to shrink by.
    zero = {g: np.zeros(n_genes) for g in genes}
    kept = shrink_single_changes(changes, zero, prior="adaptive")
    np.testing.assert_array_equal(kept["G0"], measured[0].astype(np.float32))


def test_measure_training_is_the_same_with_or_without_the_other_perturbations():
    """The singles' changes and pooled errors do not depend on what else is measured, nor on
    where the singles sit in the split (a gene spelled both "A+ctrl" and "ctrl+A")."""
    from types import SimpleNamespace

    from scformer_jax.prior import SquaredErrors, measure_training, shrink_single_changes

    rng = np.random.default_rng(0)
    n_genes = 300
    values = rng.gamma(2.0, 1.0, (60, n_genes))
    conditions = ["ctrl", "A+ctrl", "B+ctrl", "C+ctrl", "ctrl+A", "A+B"]
    cells = {c: np.arange(10 * i, 10 * i + 10) for i, c in enumerate(conditions)}

    def moments(rows):
        block = values[rows]
        mean = block.mean(axis=0)
        return mean, ((block - mean) ** 2).sum(axis=0)

    data = SimpleNamespace(
        name="stub",
        n_genes=n_genes,
        control_mean=values[cells["ctrl"]].mean(axis=0).astype(np.float32),
        condition_cells=cells,
        expression_moments=moments,
    )
    train = ["A+B", "ctrl+A", "C+ctrl", "ctrl", "A+ctrl", "B+ctrl"]
    full = measure_training(data, train)
    singles = measure_training(data, train, singles_only=True)
    assert list(full.profiles) == ["A+B", "ctrl+A", "C+ctrl", "A+ctrl", "B+ctrl"]
    assert list(singles.profiles) == ["A+ctrl", "C+ctrl", "B+ctrl"]  # A: its last spelling
    for g in ("A", "B", "C"):
        np.testing.assert_array_equal(full.single_changes[g], singles.single_changes[g])
        np.testing.assert_array_equal(
            full.single_squared_errors[g], singles.single_squared_errors[g]
        )
    # The errors: the pooled within-condition variance over the single's cell count.
    pooled = sum(moments(cells[c])[1] for c in ("A+ctrl", "B+ctrl", "C+ctrl")) / 27
    np.testing.assert_allclose(full.single_squared_errors["B"], pooled / 10, rtol=1e-12)
    assert isinstance(full.single_squared_errors, SquaredErrors)
    # Shrinking by blocks of the lazy errors equals shrinking by the materialised ones.
    as_dict = {g: full.single_squared_errors[g] for g in full.single_squared_errors}
    for prior in ("normal", "adaptive"):
        lazy = shrink_single_changes(full.single_changes, full.single_squared_errors, prior=prior)
        eager = shrink_single_changes(full.single_changes, as_dict, prior=prior)
        for g in lazy:
            np.testing.assert_array_equal(lazy[g], eager[g])
    with pytest.raises(KeyError, match="not in the dataset"):
        measure_training(data, train + ["D+ctrl"])


def test_shrink_prior_adaptive_reaches_the_prior_and_the_shrunk_baseline(data_tiny):
    from scformer_jax.prior import (
        fit_additive_prior,
        prior_for,
        shrink_single_changes,
        single_changes_and_errors,
    )

    split = gears_split(data_tiny.conditions, split="simulation", seed=1)
    config = _tiny_model_config(
        data_tiny,
        seen_single_correction=True,
        coexpression_prior=True,
        shrink_singles=True,
        shrink_prior="adaptive",
    )
    changes, errors = single_changes_and_errors(data_tiny, split["train"])
    fitted = prior_for(config, data_tiny, split["train"])
    expected = shrink_single_changes(changes, errors, prior="adaptive")
    normal = fit_additive_prior(data_tiny, split["train"], shrink=True)
    for g in changes:
        np.testing.assert_array_equal(fitted.changes[g], expected[g])
    assert any(not np.allclose(fitted.changes[g], normal.changes[g]) for g in changes)
    with pytest.raises(ConfigError, match="model.shrink_prior: adaptive"):
        load_config(
            None,
            [
                "model.shrink_singles=false",
                "model.shrink_prior=adaptive",
                "model.unseen_in_combo=network",
            ],
        )
    with pytest.raises(ConfigError, match="model.shrink_prior: 'laplace' is not one of"):
        load_config(None, ["model.shrink_prior=laplace"])


def test_shrink_singles_shrinks_only_the_singles_that_doubles_use(data_tiny):
    from scformer_jax.prior import fit_additive_prior, prior_for, shrink_single_changes

    split = gears_split(data_tiny.conditions, split="simulation", seed=1)
    config = _tiny_model_config(
        data_tiny, seen_single_correction=True, coexpression_prior=True, shrink_singles=True
    )
    raw = fit_additive_prior(data_tiny, split["train"], coexpression=True)
    shrunk = prior_for(config, data_tiny, split["train"])
    assert set(shrunk.changes) == set(raw.changes)
    # The squared errors written out: the within-condition variance pooled over the training
    # singles, over each single's cell count.
    X = data_tiny.X.toarray().astype(np.float64)
    cells = {}
    for c in split["train"]:
        genes = data_tiny.condition_genes[c]
        if c != "ctrl" and len(genes) == 1:
            cells[genes[0]] = data_tiny.condition_cells[c]
    deviations = sum(((X[v] - X[v].mean(axis=0)) ** 2).sum(axis=0) for v in cells.values())
    pooled = deviations / sum(len(v) - 1 for v in cells.values())
    expected = shrink_single_changes(raw.changes, {g: pooled / len(v) for g, v in cells.items()})
    for g in raw.changes:
        np.testing.assert_allclose(shrunk.changes[g], expected[g], rtol=1e-4, atol=1e-6)
    stacked = np.stack([shrunk.changes[g] for g in raw.changes])
    assert np.abs(stacked).sum() < np.abs(np.stack(list(raw.changes.values()))).sum()
    # The co-expression prior keeps the measured direct effect.
    assert shrunk.coexpression.direct_effect == raw.coexpression.direct_effect

    with_shrink, without, _ = _predictor_pair(
        config, data_tiny, shrunk, changed_prior=raw, shrink_singles=False
    )
    controls = data_tiny.control_cells[:5]
    seen = sorted(raw.changes)
    double = f"{seen[0]}+{seen[1]}"
    np.testing.assert_allclose(
        with_shrink.predict_cells(double, controls),
        without.predict_cells(double, controls)
        - sum(raw.changes[g] - shrunk.changes[g] for g in seen[:2]),
        atol=1e-4,
    )
    _assert_same_predictions(with_shrink, without, (f"{seen[0]}+ctrl", "ctrl"), controls)
    with pytest.raises(ConfigError, match="shrink_singles"):
        load_config(None, ["model.seen_single_correction=false", "model.shrink_singles=true"])


def test_seen_single_correction_and_anchor_change_validation_and_eval_not_training(tmp_path):
    import json

    import eval as eval_cli
    import train as train_cli
    from scformer_jax.predict import load_predictor

    def run(name, *overrides):
        workdir = tmp_path / name
        args = [
            "--config",
            "tests/configs/tiny.yaml",
            "--workdir",
            str(workdir),
            "--no-progress",
            "--set",
            "train.epochs=1",
        ]
        for o in overrides:
            args += ["--set", o]
        assert train_cli.main(args) == 0
        epoch = [json.loads(line) for line in (workdir / "metrics.jsonl").open()][-1]
        return workdir, epoch

    plain_dir, plain = run(
        "plain",
        "model.coexpression_prior=false",
        "model.unseen_single=network",
        "model.unseen_in_combo=network",
        "model.seen_single_correction=false",
        "model.shrink_singles=false",
        "model.shrink_prior=normal",
        "model.control_anchor=false",
    )
    corrected_dir, corrected = run(
        "corrected",
        "model.coexpression_prior=false",
        "model.unseen_single=network",
        "model.unseen_in_combo=network",
        "model.seen_single_correction=true",
        "model.shrink_singles=false",
        "model.shrink_prior=normal",
    )
    # Training and the validation loss are the model's own: unchanged.
    assert corrected["train_mse"] == plain["train_mse"]
    assert corrected["val_mse"] == plain["val_mse"]
    # The validation metric scores the corrected doubles, as eval does.
    assert corrected["val_pearson_delta"] != plain["val_pearson_delta"]
    assert load_predictor(str(corrected_dir)).prior is not None
    assert load_predictor(str(plain_dir)).prior is None
    # So does the control anchor, alone (no prior): same training, another val metric.
    _, anchored = run(
        "anchored",
        "model.coexpression_prior=false",
        "model.unseen_single=network",
        "model.unseen_in_combo=network",
        "model.seen_single_correction=false",
        "model.shrink_singles=false",
        "model.shrink_prior=normal",
        "model.control_anchor=true",
    )
    assert anchored["train_mse"] == plain["train_mse"]
    assert anchored["val_mse"] == plain["val_mse"]
    assert anchored["val_pearson_delta"] != plain["val_pearson_delta"]
    metrics = {}
    for name, workdir in (("plain", plain_dir), ("corrected", corrected_dir)):
        assert eval_cli.main(["--workdir", str(workdir)]) == 0
        metrics[name] = json.loads((workdir / "eval" / "metrics.json").read_text())
    # Eval corrects the model's doubles, and only the model's: the baselines are the same.
    groups = ("combo_seen1", "combo_seen2")
    assert any(
        metrics["corrected"]["model"]["per_subgroup"][g]["pearson_delta"]
        != metrics["plain"]["model"]["per_subgroup"][g]["pearson_delta"]
        for g in groups
    )
    assert (
        metrics["corrected"]["model"]["per_subgroup"]["unseen_single"]
        == metrics["plain"]["model"]["per_subgroup"]["unseen_single"]
    )
    assert metrics["corrected"]["baselines"] == metrics["plain"]["baselines"]


def test_coexpression_prior_is_the_control_regression_scaled_by_the_direct_effect(data_tiny):
    from scformer_jax.prior import RIDGE, fit_additive_prior

    split = gears_split(data_tiny.conditions, split="simulation", seed=1)
    prior = fit_additive_prior(data_tiny, split["train"], coexpression=True)
    assert fit_additive_prior(data_tiny, split["train"]).coexpression is None
    controls = data_tiny.X[data_tiny.control_cells].toarray().astype(np.float64)
    names = list(data_tiny.gene_names)
    measured = [g for g in prior.changes if g in names]
    d = np.mean([prior.changes[g][names.index(g)] for g in measured])
    assert prior.coexpression.direct_effect == pytest.approx(d, rel=1e-5)
    var = controls.var(axis=0, ddof=1)
    # Any measured gene, perturbed in the data or not.
    for gene in (measured[0], names[-1]):
        j = names.index(gene)
        slope = np.array(
            [np.cov(controls[:, j], controls[:, k])[0, 1] for k in range(len(names))]
        ) / (var[j] + RIDGE * var.mean())
        slope[j] = 1.0
        np.testing.assert_allclose(prior.coexpression.effect(gene), d * slope, rtol=1e-4, atol=1e-6)
    assert prior.coexpression.effect("NOT_A_GENE") is None
    # A condition's prior is the sum of its genes' effects; training targets lose it, and
    # with the additive prior also the measured singles' part.
    a, b = measured[:2]
    double = f"{a}+{b}"
    np.testing.assert_allclose(
        prior.effect_offset(double, data_tiny.n_genes),
        prior.coexpression.effect(a) + prior.coexpression.effect(b),
        rtol=1e-6,
    )
    plain = prior.offsets([double, f"{a}+ctrl"], data_tiny.n_genes, additive=False)
    np.testing.assert_allclose(plain[f"{a}+ctrl"], prior.coexpression.effect(a), rtol=1e-6)
    both = prior.offsets([double], data_tiny.n_genes)
    np.testing.assert_allclose(
        both[double], plain[double] + prior.parts(double, data_tiny.n_genes)[0], rtol=1e-6
    )


def test_predictor_adds_the_coexpression_prior(data_tiny):
    from scformer_jax.predict import Predictor
    from scformer_jax.prior import prior_for

    split = gears_split(data_tiny.conditions, split="simulation", seed=1)
    config = _tiny_model_config(data_tiny, coexpression_prior=True, output_baseline="control_input")
    prior = prior_for(config, data_tiny, split["train"])
    with_prior, plain, params = _predictor_pair(config, data_tiny, prior, coexpression_prior=False)
    controls = data_tiny.control_cells[:5]
    genes = sorted(prior.changes)
    for condition in (f"{genes[0]}+ctrl", f"{genes[0]}+{genes[1]}", "ctrl"):
        np.testing.assert_allclose(
            with_prior.predict_cells(condition, controls),
            plain.predict_cells(condition, controls)
            + prior.effect_offset(condition, data_tiny.n_genes),
            atol=1e-5,
        )
    assert np.abs(prior.effect_offset(f"{genes[0]}+ctrl", data_tiny.n_genes)).sum() > 0
    # The correction of doubles uses the model's singles with their co-expression prior.
    corrected = Predictor(
        dataclasses.replace(config, seen_single_correction=True),
        params,
        data_tiny,
        batch_size=8,
        prior=prior,
    )
    ctrl = data_tiny.X[data_tiny.control_cells].toarray().mean(axis=0)
    double = f"{genes[0]}+{genes[1]}"
    expected = with_prior.predict_cells(double, controls) + sum(
        ctrl + prior.changes[g] - with_prior.predict_cells(f"{g}+ctrl", controls) for g in genes[:2]
    )
    np.testing.assert_allclose(corrected.predict_cells(double, controls), expected, atol=1e-4)


@pytest.mark.parametrize("value", ["prior", "no_network"])
def test_unseen_single_replaces_the_networks_guess_for_unseen_measured_genes(data_tiny, value):
    from scformer_jax.prior import prior_for

    split = gears_split(data_tiny.conditions, split="simulation", seed=1)
    config = _tiny_model_config(
        data_tiny,
        coexpression_prior=True,
        seen_single_correction=True,
        unseen_single=value,
        output_baseline="control_input",
    )
    prior = prior_for(config, data_tiny, split["train"])
    chosen, network, _ = _predictor_pair(config, data_tiny, prior, unseen_single="network")
    controls = data_tiny.control_cells[:5]
    names = list(data_tiny.gene_names)
    seen = sorted(prior.changes)
    unseen = next(
        g
        for c in split["test"]
        for g in data_tiny.condition_genes[c]
        if g not in prior.changes and g in names
    )
    single = f"{unseen}+ctrl"
    effect = prior.effect_offset(single, data_tiny.n_genes)
    assert np.abs(effect).sum() > 0
    # prior: the control cell as the model predicts it unperturbed, plus the co-expression
    # prior; no_network: the control cells' mean plus that prior (the coexpression
    # baseline's prediction), the same for every cell, with no network output in it.
    unperturbed = network.predict_cells("ctrl", controls) + effect
    ctrl = data_tiny.X[data_tiny.control_cells].toarray().mean(axis=0)
    mean = np.broadcast_to(ctrl + effect, unperturbed.shape)
    expected, other = (unperturbed, mean) if value == "prior" else (mean, unperturbed)
    np.testing.assert_allclose(chosen.predict_cells(single, controls), expected, atol=1e-5)
    assert not np.allclose(expected, other, atol=1e-3)
    assert not np.allclose(expected, network.predict_cells(single, controls), atol=1e-3)
    assert chosen._network_outputs(single) == (1 if value == "prior" else 0)
    # Validation adds prior_part to the network's output (given, or computed): the same
    # prediction.
    network_cells = chosen._model_cells(single, controls)
    for given in (None, network_cells):
        np.testing.assert_allclose(
            network_cells + chosen.prior_part(single, controls, given), expected, atol=1e-5
        )
    # Measured singles, doubles (also with an unseen gene) and the control are unchanged.
    for condition in (f"{seen[0]}+ctrl", f"{seen[0]}+{unseen}", f"{seen[0]}+{seen[1]}", "ctrl"):
        np.testing.assert_allclose(
            chosen.predict_cells(condition, controls),
            network.predict_cells(condition, controls),
            atol=1e-6,
        )
    with pytest.raises(ConfigError, match=f"unseen_single: {value}.*coexpression_prior"):
        load_config(None, ["model.coexpression_prior=false", f"model.unseen_single={value}"])
    with pytest.raises(ConfigError, match="unseen_single"):
        load_config(None, ["model.unseen_single=guess"])


def _unseen_in_combo_pair(data, value, **extra):
    """A predictor with ``model.unseen_in_combo: value`` and one with ``network`` on the same
    untrained parameters, under both priors, with five control cells, the genes with a
    training single and the measured test genes without one. Returns (chosen, network,
    prior, controls, seen, unseen)."""
    from scformer_jax.prior import prior_for

    split = gears_split(data.conditions, split="simulation", seed=1)
    config = _tiny_model_config(
        data,
        coexpression_prior=True,
        seen_single_correction=True,
        unseen_single="prior",
        unseen_in_combo=value,
        **extra,
    )
    prior = prior_for(config, data, split["train"])
    chosen, network, _ = _predictor_pair(config, data, prior, unseen_in_combo="network")
    names = list(data.gene_names)
    unseen = [
        g
        for g in dict.fromkeys(
            g for c in split["test"] for g in data.condition_genes[c] if g in names
        )
        if g not in prior.changes
    ]
    assert len(unseen) >= 2
    return chosen, network, prior, data.control_cells[:5], sorted(prior.changes), unseen


def _check_unseen_in_combo(chosen, network, controls, seen, unseen, doubles, value):
    """Each double's prediction: validation's route (the network's output plus prior_part)
    gives the same, and it differs from the network's; doubles of measured singles, singles
    and the control are the network's; the option needs both priors."""
    for double in doubles:
        got = chosen.predict_cells(double, controls)
        assert not np.allclose(got, network.predict_cells(double, controls), atol=1e-3)
        np.testing.assert_allclose(
            chosen._model_cells(double, controls) + chosen.prior_part(double, controls),
            got,
            atol=1e-4,
        )
    _assert_same_predictions(
        chosen,
        network,
        (f"{seen[0]}+{seen[1]}", f"{seen[0]}+ctrl", f"{unseen[0]}+ctrl", "ctrl"),
        controls,
    )
    for needed in ([], ["model.seen_single_correction=true"], ["model.coexpression_prior=true"]):
        with pytest.raises(ConfigError, match=f"unseen_in_combo: {value}"):
            load_config(None, [f"model.unseen_in_combo={value}", *needed])


def test_unseen_in_combo_prior_takes_the_networks_guess_for_unseen_genes_out_of_doubles(
    data_tiny,
):
    chosen, network, _, controls, seen, unseen = _unseen_in_combo_pair(
        data_tiny, "prior", output_baseline="control_input"
    )
    unperturbed = network.predict_cells("ctrl", controls)
    # A double with one unseen gene: the network's output for that gene's single is replaced
    # by the unperturbed prediction (its co-expression prior is in both); with two, both.
    doubles = {f"{seen[0]}+{unseen[0]}": unseen[:1], f"{unseen[0]}+{unseen[1]}": unseen[:2]}
    for double, stand_ins in doubles.items():
        expected = network.predict_cells(double, controls) + sum(
            unperturbed - network._model_cells(f"{g}+ctrl", controls) for g in stand_ins
        )
        np.testing.assert_allclose(chosen.predict_cells(double, controls), expected, atol=1e-4)
    _check_unseen_in_combo(chosen, network, controls, seen, unseen, doubles, "prior")
    both = ["model.seen_single_correction=true", "model.coexpression_prior=true"]
    assert load_config(None, ["model.unseen_in_combo=prior", *both]).model.unseen_in_combo == (
        "prior"
    )
    with pytest.raises(ConfigError, match="unseen_in_combo"):
        load_config(None, ["model.unseen_in_combo=guess"])


def test_unseen_in_combo_no_network_predicts_doubles_with_an_unseen_gene_from_the_priors(
    data_tiny,
):
    from scformer_jax.prior import prior_for

    chosen, network, prior, controls, seen, unseen = _unseen_in_combo_pair(
        data_tiny, "no_network", shrink_singles=True
    )
    ctrl = np.asarray(data_tiny.control_mean, np.float32)
    effect = {g: prior.coexpression.effect(g) for g in unseen[:2]}
    doubles = {
        f"{seen[0]}+{unseen[0]}": ctrl + prior.changes[seen[0]] + effect[unseen[0]],
        f"{unseen[0]}+{unseen[1]}": ctrl + effect[unseen[0]] + effect[unseen[1]],
    }
    for double, expected in doubles.items():
        got = chosen.predict_cells(double, controls)
        # The control mean, the (shrunk) measured single and the co-expression prior of the
        # unseen gene, for every cell: no network output.
        np.testing.assert_allclose(got, np.broadcast_to(expected, got.shape), atol=1e-5)
    # The measured single is the shrunk one (shrink_singles), not the raw mean change.
    split = gears_split(data_tiny.conditions, split="simulation", seed=1)
    raw = prior_for(
        dataclasses.replace(chosen.model_config, shrink_singles=False), data_tiny, split["train"]
    ).changes[seen[0]]
    assert not np.allclose(prior.changes[seen[0]], raw, atol=1e-4)
    _check_unseen_in_combo(chosen, network, controls, seen, unseen, doubles, "no_network")


def test_control_anchor_sets_each_prediction_on_the_control_mean(data_tiny):
    from scformer_jax.predict import Predictor
    from scformer_jax.prior import prior_for

    split = gears_split(data_tiny.conditions, split="simulation", seed=1)
    config = _tiny_model_config(
        data_tiny,
        coexpression_prior=True,
        seen_single_correction=True,
        unseen_single="prior",
        output_baseline="control_input",
    )
    prior = prior_for(config, data_tiny, split["train"])
    plain, anchored, params = _predictor_pair(config, data_tiny, prior, control_anchor=True)
    controls = data_tiny.control_cells[:6]
    ctrl_mean = np.asarray(data_tiny.control_mean, np.float64)
    # The network's drift on these cells: its unperturbed prediction's mean minus the
    # control mean (not zero for an untrained network).
    drift = plain.predict_cells("ctrl", controls).mean(0) - ctrl_mean
    assert np.abs(drift).max() > 1e-3
    names = list(data_tiny.gene_names)
    seen = sorted(prior.changes)
    unseen = next(
        g
        for c in split["test"]
        for g in data_tiny.condition_genes[c]
        if g not in prior.changes and g in names
    )
    # Network outputs in each prediction, with their sign: the condition's own, minus one
    # per measured single that corrects a double.
    cases = {
        "ctrl": 1,
        f"{seen[0]}+ctrl": 1,
        f"{unseen}+ctrl": 1,
        f"{seen[0]}+{unseen}": 0,
        f"{seen[0]}+{seen[1]}": -1,
    }
    for condition, k in cases.items():
        got = anchored.predict_cells(condition, controls)
        want = plain.predict_cells(condition, controls) - k * drift
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=condition)
        # Validation adds prior_part to the network's output: the same prediction.
        network_cells = anchored._model_cells(condition, controls)
        np.testing.assert_allclose(
            network_cells + anchored.prior_part(condition, controls, network_cells),
            got,
            atol=1e-4,
            err_msg=condition,
        )
    # The control itself predicts the control mean on average, and an unseen single the
    # control mean plus its co-expression prior; each cell keeps its own variation.
    ctrl_cells = anchored.predict_cells("ctrl", controls)
    np.testing.assert_allclose(ctrl_cells.mean(0), ctrl_mean, atol=1e-4)
    assert np.ptp(ctrl_cells, axis=0).max() > 1e-2
    np.testing.assert_allclose(
        anchored.predict_cells(f"{unseen}+ctrl", controls).mean(0),
        ctrl_mean + prior.effect_offset(f"{unseen}+ctrl", data_tiny.n_genes),
        atol=1e-4,
    )
    # Without any prior the anchor applies alone.
    bare = _tiny_model_config(data_tiny, output_baseline="control_input", control_anchor=True)
    alone = Predictor(bare, params, data_tiny, batch_size=8)
    assert alone.prior is None
    np.testing.assert_allclose(alone.predict_cells("ctrl", controls).mean(0), ctrl_mean, atol=1e-4)


def test_randomized_components_match_the_exact_ones():
    from scformer_jax import gene_features

    rng = np.random.default_rng(0)
    # A matrix with a clear spectrum: 6 strong directions plus noise.
    matrix = (rng.standard_normal((300, 6)) * [40, 30, 20, 15, 10, 8]) @ rng.standard_normal(
        (6, 2000)
    ) + 0.1 * rng.standard_normal((300, 2000))
    assert min(matrix.shape) <= gene_features.EXACT_SVD_MAX
    exact = gene_features.top_components(matrix.T, 4)  # (2000, 300): smaller side 300
    randomized = gene_features.top_components(matrix.T, 4, exact_max=100)
    # Components are defined up to sign.
    for j in range(4):
        a, b = exact[:, j], randomized[:, j]
        np.testing.assert_allclose(abs(a @ b) / (a @ a), 1.0, atol=1e-6)


def test_screen_preset_is_a_singles_screen_of_mostly_unmeasured_genes():
    from scformer_jax.data.simulate import simulate, simulation_config

    adata = simulate(simulation_config("screen", cells_per_condition=6, n_control_cells=60), seed=0)
    conditions = set(adata.obs["condition"].astype(str))
    assert adata.n_vars == 300
    assert all(c == "ctrl" or c.endswith("+ctrl") for c in conditions)
    genes = {c.split("+")[0] for c in conditions if c != "ctrl"}
    measured = set(adata.var["gene_name"].astype(str))
    assert len(genes) == 100 and len(genes - measured) == 80


def test_init_from_data_starts_the_gene_baseline_at_the_control_mean(data_tiny):
    from scformer_jax.gene_features import init_from_data

    config = _tiny_model_config(data_tiny, output_baseline="gene_mean")
    params = init_params(config, jax.random.PRNGKey(0))
    assert not np.asarray(params["gene_baseline"]).any()
    split = gears_split(data_tiny.conditions, split="simulation", seed=1)
    new = init_from_data(params, config, data_tiny, split["train"])
    baseline = np.asarray(new["gene_baseline"])
    ctrl = data_tiny.X[data_tiny.control_cells].toarray().mean(axis=0)
    np.testing.assert_allclose(baseline[data_tiny.gene_token_ids], ctrl, atol=1e-5)
    others = np.setdiff1d(np.arange(data_tiny.n_tokens), data_tiny.gene_token_ids)
    assert not baseline[others].any()
    # gene_embedding_init "random": the embedding is left alone.
    np.testing.assert_array_equal(
        np.asarray(new["encoder"]["embedding"]), np.asarray(params["encoder"]["embedding"])
    )
    with_embedding = init_from_data(
        params, dataclasses.replace(config, gene_embedding_init="data"), data_tiny, split["train"]
    )
    assert not np.allclose(
        np.asarray(with_embedding["encoder"]["embedding"]),
        np.asarray(params["encoder"]["embedding"]),
    )
    kept = init_from_data(
        params,
        dataclasses.replace(config, gene_embedding_init="data"),
        data_tiny,
        split["train"],
        embedding=False,
    )
    np.testing.assert_array_equal(
        np.asarray(kept["encoder"]["embedding"]), np.asarray(params["encoder"]["embedding"])
    )
