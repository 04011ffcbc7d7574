"""PerturbData: vocabulary, conditions, control mean, DE indices, labels, load_dataset."""

import numpy as np
import pytest
from scipy import sparse

from scformer_jax.data.conditions import DataFormatError
from scformer_jax.data.dataset import PerturbData, UnknownGeneError, load_dataset


def test_vocabulary_layout(data_tiny):
    d = data_tiny
    # Genes first (token = column), then <pad>, <cls>, <eoc>: the original's vocabulary.
    assert d.token_names[: d.n_genes] == list(d.gene_names)
    assert d.token_names[d.n_genes :] == ["<pad>", "<cls>", "<eoc>"]
    assert (d.pad_token_id, d.cls_token_id, d.eoc_token_id) == (
        d.n_genes,
        d.n_genes + 1,
        d.n_genes + 2,
    )
    assert d.n_tokens == d.n_genes + 3
    np.testing.assert_array_equal(d.gene_token_ids, np.arange(d.n_genes))
    for gene in d.gene_names[:5]:
        assert d.token_names[d.vocab[gene]] == gene


def test_unmeasured_perturbed_gene_gets_a_token(data_tiny_unmeasured):
    d = data_tiny_unmeasured
    assert len(d.unmeasured_genes) == 1
    gene = d.unmeasured_genes[0]
    assert gene not in set(d.gene_names)
    assert d.vocab[gene] == d.n_genes
    assert d.pad_token_id == d.n_genes + 1 and d.n_tokens == d.n_genes + 4
    tokens, columns = d.perturbed_tokens(f"{gene}+ctrl")
    assert tokens.tolist() == [d.n_genes] and columns.tolist() == [-1]


def test_unmeasured_gene_warns_on_load(data_tiny_unmeasured):
    from scformer_jax.data.simulate import simulate, simulation_config

    adata = simulate(simulation_config("tiny", n_unmeasured_pert_genes=1), seed=0)
    with pytest.warns(UserWarning, match="not among the measured genes"):
        PerturbData(adata)


def test_conditions_and_cells(data_tiny, data_tiny_adata):
    d = data_tiny
    cond = data_tiny_adata.obs["condition"].astype(str).to_numpy()
    assert d.conditions[0] == cond[0] and set(d.conditions) == set(cond)
    for c in d.conditions:
        np.testing.assert_array_equal(d.condition_cells[c], np.flatnonzero(cond == c))
    np.testing.assert_array_equal(d.control_cells, np.flatnonzero(cond == "ctrl"))
    X = data_tiny_adata.X.toarray()
    np.testing.assert_allclose(d.control_mean, X[cond == "ctrl"].mean(axis=0), rtol=1e-5)
    some = d.conditions[3]
    np.testing.assert_allclose(d.condition_mean(some), X[cond == some].mean(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(
        d.cells_of([some, "ctrl"]), np.flatnonzero(np.isin(cond, [some, "ctrl"]))
    )
    assert sparse.isspmatrix_csr(d.X)


def test_de_indices_from_uns(data_tiny, data_tiny_adata):
    d = data_tiny
    uns = data_tiny_adata.uns
    var = list(data_tiny_adata.var_names)
    perturbed = [c for c in d.conditions if c != "ctrl"]
    assert set(d.de_rank) == set(perturbed)
    for c in perturbed[:5]:
        key = d.condition_name_of[c]
        assert key == f"simcell_{c}_1+1"
        expected = [var.index(g) for g in uns["rank_genes_groups_cov_all"][key]]
        np.testing.assert_array_equal(d.de_rank[c], expected)
        np.testing.assert_array_equal(d.de_indices(c), expected[:20])
        np.testing.assert_array_equal(d.top_de_20[c], expected[:20])
        np.testing.assert_array_equal(
            d.de_indices(c, non_dropout=True),
            [var.index(g) for g in uns["top_non_dropout_de_20"][key]],
        )
        np.testing.assert_array_equal(d.non_zeros_gene_idx[c], uns["non_zeros_gene_idx"][key])
    with pytest.raises(KeyError, match="'ctrl'"):
        d.de_indices("ctrl")


def test_labels_from_configurable_column(data_tiny_adata):
    adata = data_tiny_adata.copy()
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 3 == 0, "b0", "b1")
    d = PerturbData(adata, label_key="batch")
    assert d.label_names == ["b0", "b1"]
    np.testing.assert_array_equal(d.labels, (np.arange(adata.n_obs) % 3 != 0).astype(int))
    default = PerturbData(adata)
    assert default.label_names == ["simcell"] and set(default.labels) == {0}
    with pytest.raises(DataFormatError, match="'tissue'"):
        PerturbData(adata, label_key="tissue")


def test_unknown_gene(data_tiny):
    with pytest.raises(UnknownGeneError, match="'NOPE'"):
        data_tiny.perturbed_tokens("NOPE+ctrl")
    with pytest.raises(DataFormatError, match="Malformed"):
        data_tiny.perturbed_tokens("A+B+C")
    # A double that is not in the data but whose genes are known works (prediction).
    genes = sorted({g for c in data_tiny.conditions for g in data_tiny.condition_genes[c]})
    tokens, columns = data_tiny.perturbed_tokens(f"{genes[0]}+{genes[-1]}")
    assert columns.tolist() == [data_tiny.column_of(genes[0]), data_tiny.column_of(genes[-1])]


def test_unknown_condition(data_tiny):
    with pytest.raises(KeyError, match="'X\\+ctrl'"):
        data_tiny.cells_of(["X+ctrl"])


def test_builtin_names():
    d = load_dataset("simulated:tiny", seed=3)
    assert d.name == "simulated:tiny" and d.n_genes == 40
    again = load_dataset("simulated:tiny", seed=3)
    assert (d.X != again.X).nnz == 0
    small = load_dataset("simulated", preset="tiny", simulation={"n_genes": 30})
    assert small.n_genes == 30
    with pytest.raises(DataFormatError, match="only to the built-in names"):
        load_dataset("/no/such/file.h5ad", preset="tiny")
