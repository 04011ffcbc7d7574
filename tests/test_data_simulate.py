"""The built-in simulated dataset: determinism, GEARS layout, biology of the generator."""

import numpy as np
import pytest

from scformer_jax.data.de import rank_genes_vs_control
from scformer_jax.data.gears_io import UNS_KEYS
from scformer_jax.data.simulate import (
    PRESETS,
    SimulationConfig,
    simulate,
    simulation_config,
    simulation_truth,
)


def _means(adata):
    X = adata.X.toarray()
    cond = adata.obs["condition"].astype(str).to_numpy()
    return {c: X[cond == c].mean(axis=0) for c in np.unique(cond)}


def test_same_seed_same_data_other_seed_other_data(data_tiny_adata):
    again = simulate("tiny", seed=0)
    assert (again.X != data_tiny_adata.X).nnz == 0
    assert again.obs["condition"].tolist() == data_tiny_adata.obs["condition"].tolist()
    for key in UNS_KEYS:
        assert set(again.uns[key]) == set(data_tiny_adata.uns[key])
    other = simulate("tiny", seed=1)
    assert other.shape[1] == data_tiny_adata.shape[1]
    assert other.shape != data_tiny_adata.shape or (other.X != data_tiny_adata.X).nnz > 0


def test_gears_layout(data_tiny_adata):
    a = data_tiny_adata
    cfg = PRESETS["tiny"]
    for column in ("condition", "cell_type", "condition_name", "dose_val", "control"):
        assert column in a.obs
    assert "gene_name" in a.var
    for key in UNS_KEYS + ("top_non_zero_de_20",):
        assert key in a.uns
    conditions = a.obs["condition"].astype(str)
    assert (conditions == "ctrl").sum() == cfg.n_control_cells
    singles = [c for c in conditions.unique() if c.endswith("+ctrl")]
    doubles = [c for c in conditions.unique() if c != "ctrl" and "ctrl" not in c]
    assert len(singles) == cfg.n_pert_genes and len(doubles) == cfg.n_combos
    # GEARS's condition_name: {cell_type}_{condition}_{dose}, dose 1+1 for every '+'.
    for cond, name in zip(conditions, a.obs["condition_name"].astype(str)):
        assert name == f"simcell_{cond}_{'1' if cond == 'ctrl' else '1+1'}"
    # Every gene of a double also has its single (as in Norman).
    for d in doubles:
        for g in d.split("+"):
            assert f"{g}+ctrl" in singles
    # DE keyed by condition_name of every non-control condition; full rankings.
    names = set(a.obs["condition_name"].astype(str)) - {"simcell_ctrl_1"}
    assert set(a.uns["rank_genes_groups_cov_all"]) == names
    for ranked in a.uns["rank_genes_groups_cov_all"].values():
        assert sorted(ranked) == sorted(a.var_names)
    # log1p of counts normalised to 1e4: expm1 of each row sums to <= 1e4 (measured subset).
    totals = np.expm1(a.X.toarray().astype(np.float64)).sum(axis=1)
    np.testing.assert_allclose(totals, 1e4, rtol=1e-3)


def test_perturbed_gene_moves_in_its_direction(data_tiny_adata):
    means = _means(data_tiny_adata)
    genes = list(data_tiny_adata.var["gene_name"])
    mode = simulation_truth(data_tiny_adata)["perturbation_mode"]
    moved = 0
    for gene, how in mode.items():
        delta = means[f"{gene}+ctrl"][genes.index(gene)] - means["ctrl"][genes.index(gene)]
        if abs(delta) > 0.2:
            moved += 1
            assert (delta < 0) == (how == "knockdown"), (gene, how, delta)
    assert moved >= len(mode) - 2


def test_effects_propagate_through_the_network():
    cfg = simulation_config("tiny", noise_sd=0.0, umis_per_gene=2000.0, library_sd=0.0)
    a = simulate(cfg, seed=2)
    means = _means(a)
    truth = simulation_truth(a)
    genes = list(a.var["gene_name"])
    targets = {}
    for regulator, target, _ in truth["edges"]:
        targets.setdefault(regulator, set()).add(target)
    checked = 0
    for gene in truth["perturbation_mode"]:
        if gene not in targets:
            continue
        delta = np.abs(means[f"{gene}+ctrl"] - means["ctrl"])
        direct = [genes.index(t) for t in targets[gene]]
        unrelated = [i for i, g in enumerate(genes) if g != gene and g not in targets[gene]]
        # Direct targets move more than the average other gene.
        assert delta[direct].mean() > delta[unrelated].mean()
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("kind", ["synergistic", "buffering"])
def test_interactions_scale_the_joint_response(kind):
    """Same network and cells, only the interaction type of the doubles differs."""
    base = dict(noise_sd=0.0, umis_per_gene=2000.0, library_sd=0.0, efficiency_low=1.0)
    additive = simulate(
        simulation_config("tiny", interaction_probs=(1.0, 0.0, 0.0), **base), seed=0
    )
    probs = (0.0, 1.0, 0.0) if kind == "synergistic" else (0.0, 0.0, 1.0)
    other = simulate(simulation_config("tiny", interaction_probs=probs, **base), seed=0)
    assert set(simulation_truth(other)["interaction"].values()) == {kind}
    m_add, m_other = _means(additive), _means(other)
    ctrl = m_add["ctrl"]
    # Same network and control cells; only the count sampling noise differs.
    np.testing.assert_allclose(m_other["ctrl"], ctrl, atol=0.1)
    genes = list(additive.var["gene_name"])
    ratios = []
    for cond in simulation_truth(other)["interaction"]:
        downstream = np.ones(len(genes), bool)
        downstream[[genes.index(g) for g in cond.split("+")]] = False
        d_add = np.abs(m_add[cond] - ctrl)[downstream].sum()
        d_other = np.abs(m_other[cond] - ctrl)[downstream].sum()
        if d_add > 0.5:
            ratios.append(d_other / d_add)
    assert len(ratios) >= 3
    if kind == "synergistic":
        assert np.median(ratios) > 1.2
    else:
        assert np.median(ratios) < 0.7


def test_unmeasured_perturbed_genes_are_not_columns():
    a = simulate(simulation_config("tiny", n_unmeasured_pert_genes=2), seed=0)
    truth = simulation_truth(a)
    assert len(truth["unmeasured_genes"]) == 2
    assert a.n_vars == PRESETS["tiny"].n_genes
    conditions = set(a.obs["condition"].astype(str))
    for gene in truth["unmeasured_genes"]:
        assert gene not in set(a.var["gene_name"])
        assert f"{gene}+ctrl" in conditions


def test_numpy_de_matches_scanpy(data_tiny_adata):
    """The simulator's vectorised t-test ranks genes as scanpy's rank_genes_groups does."""
    a = data_tiny_adata.copy()
    fast = rank_genes_vs_control(a, backend="numpy")
    slow = rank_genes_vs_control(a, backend="scanpy")
    assert set(fast) == set(slow)
    # Independent Welch t statistic for one condition.
    X = a.X.toarray().astype(np.float64)
    names = a.obs["condition_name"].astype(str).to_numpy()
    for group in list(fast)[:5]:
        g, r = X[names == group], X[names == "simcell_ctrl_1"]
        t = (g.mean(0) - r.mean(0)) / np.sqrt(g.var(0, ddof=1) / len(g) + r.var(0, ddof=1) / len(r))
        t[np.isnan(t)] = 0
        order = np.argsort(-np.abs(t), kind="stable")
        expected = a.var_names[order][:20]
        # Ties (equal |t|) may be ordered differently; compare the untied prefix.
        strength = np.abs(t)[order][:21]
        untied = int(np.argmax(np.diff(strength) == 0)) if np.any(np.diff(strength) == 0) else 20
        assert list(fast[group][:untied]) == list(expected[:untied])
        assert list(slow[group][:untied]) == list(expected[:untied])
        assert set(fast[group][:20]) == set(slow[group][:20])


def test_non_dropout_sets_follow_gears_definition(data_tiny_adata):
    a = data_tiny_adata
    means = _means(a)
    name_to_cond = dict(zip(a.obs["condition_name"].astype(str), a.obs["condition"].astype(str)))
    var = list(a.var_names)
    for name, ranked in list(a.uns["rank_genes_groups_cov_all"].items())[:6]:
        mean, ctrl = means[name_to_cond[name]], means["ctrl"]
        non_zero = np.flatnonzero(mean != 0)
        non_dropout = np.sort(
            np.concatenate(
                [non_zero, np.intersect1d(np.flatnonzero(mean == 0), np.flatnonzero(ctrl == 0))]
            )
        )
        np.testing.assert_array_equal(a.uns["non_zeros_gene_idx"][name], non_zero)
        np.testing.assert_array_equal(a.uns["non_dropout_gene_idx"][name], non_dropout)
        expected = [g for g in ranked if var.index(g) in set(non_dropout)][:20]
        assert list(a.uns["top_non_dropout_de_20"][name]) == expected


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="n_combos"):
        SimulationConfig(n_pert_genes=3, n_combos=10)
    with pytest.raises(ValueError, match="Unknown simulation option"):
        simulation_config("tiny", n_gnes=10)
    with pytest.raises(ValueError, match="Unknown simulation preset"):
        simulation_config("huge")
    with pytest.raises(ValueError, match="seed"):
        simulate("tiny", seed=-1)


def test_default_preset_size_is_small():
    cfg = PRESETS["default"]
    n_conditions = cfg.n_pert_genes + cfg.n_combos
    approx_cells = cfg.n_control_cells + n_conditions * cfg.cells_per_condition
    assert 100 <= cfg.n_genes <= 200 and 30 <= cfg.n_pert_genes <= 60
    assert 1000 <= approx_cells <= 6000
