"""GEARS batch -> two-channel batch, for both GEARS layouts of x (the original's crash)."""

import warnings

import numpy as np
import pytest

from scformer_jax.data.adapter import from_gears_batch
from scformer_jax.data.batching import assemble_batch


def _gears_batch(data, n=6, start=0):
    """A GEARS-style batch: x (n * n_genes, 1), y (n, n_genes), pert, pert_idx, pert_names."""
    perturbed = [c for c in data.conditions if c != "ctrl"]
    conditions = (perturbed[start : start + n - 1] + ["ctrl"])[:n]
    targets = np.array([data.condition_cells[c][0] for c in conditions])
    controls = data.control_cells[:n]
    X = data.X.toarray()
    # GEARS's GO-graph gene list: another order than the expression columns, with extras.
    genes = sorted({g for c in data.conditions for g in data.condition_genes[c]})
    pert_names = np.array(["ZZZ1"] + genes[::-1] + ["AAA0"])
    pert_idx = [
        [int(np.flatnonzero(pert_names == g)[0]) for g in data.condition_genes[c]] or [-1]
        for c in conditions
    ]
    x = X[controls].reshape(-1, 1)
    return dict(
        x=x,
        y=X[targets],
        pert=conditions,
        pert_idx=pert_idx,
        pert_names=pert_names,
        targets=targets,
        controls=controls,
    )


def test_one_column_layout_flags_from_condition_names(data_tiny):
    g = _gears_batch(data_tiny)
    batch = from_gears_batch(
        g["x"], g["y"], g["pert"], g["pert_idx"], g["pert_names"], gene_names=data_tiny.gene_names
    )
    batch.check()
    n, n_genes = len(g["pert"]), data_tiny.n_genes
    assert batch.gene_ids.shape == (n, n_genes)
    np.testing.assert_array_equal(batch.gene_ids, np.tile(np.arange(n_genes), (n, 1)))
    np.testing.assert_array_equal(batch.control_values, g["x"].reshape(n, n_genes))
    np.testing.assert_array_equal(batch.target_values, g["y"])
    for r, condition in enumerate(g["pert"]):
        expected = np.zeros(n_genes)
        expected[[data_tiny.column_of(gene) for gene in data_tiny.condition_genes[condition]]] = 1
        np.testing.assert_array_equal(batch.pert_flags[r], expected)
        # Reading pert_idx as expression columns (the tempting repair) flags other genes.
        if condition != "ctrl":
            wrong = np.zeros(n_genes)
            wrong[[i for i in g["pert_idx"][r] if i < n_genes]] = 1
            assert np.any(wrong != expected)
    # Same content as our own loader's 'all' batch for the same cell pairs.
    ours = assemble_batch(data_tiny, g["targets"], g["controls"])
    for field in ("gene_ids", "inputs", "target_values", "padding_mask"):
        np.testing.assert_array_equal(getattr(batch, field), getattr(ours.batch, field))


def test_two_column_layout_gives_the_same_batch(data_tiny):
    g = _gears_batch(data_tiny)
    one = from_gears_batch(g["x"], g["y"], g["pert"], gene_names=data_tiny.gene_names)
    flags = one.pert_flags.reshape(-1, 1)
    two = from_gears_batch(
        np.concatenate([g["x"], flags], axis=1), g["y"], g["pert"], gene_names=data_tiny.gene_names
    )
    np.testing.assert_array_equal(one.inputs, two.inputs)
    with pytest.warns(UserWarning, match="disagrees with the condition names"):
        from_gears_batch(
            np.concatenate([g["x"], np.zeros_like(flags)], axis=1),
            g["y"],
            g["pert"],
            gene_names=data_tiny.gene_names,
        )


def test_pert_idx_that_names_other_genes_is_an_error(data_tiny):
    g = _gears_batch(data_tiny)
    shifted = [[(i + 1) if i >= 0 else -1 for i in idx] for idx in g["pert_idx"]]
    with pytest.raises(ValueError, match="pert_idx points at"):
        from_gears_batch(
            g["x"], g["y"], g["pert"], shifted, g["pert_names"], gene_names=data_tiny.gene_names
        )


def test_unmeasured_gene_becomes_an_extra_token(data_tiny_unmeasured):
    d = data_tiny_unmeasured
    gene = d.unmeasured_genes[0]
    cond = f"{gene}+ctrl"
    X = d.X.toarray()
    cells = [d.condition_cells[cond][0], d.control_cells[0]]
    x, y = X[d.control_cells[:2]].reshape(-1, 1), X[cells]
    with pytest.warns(UserWarning, match=gene):
        batch = from_gears_batch(x, y, [cond, "ctrl"], gene_names=d.gene_names, vocab=d)
    assert batch.gene_ids.shape == (2, d.n_genes + 1)
    assert batch.gene_ids[0, -1] == d.vocab[gene] and batch.pert_flags[0, -1] == 1
    assert batch.control_values[0, -1] == 0 and not batch.padding_mask[0, -1]
    assert batch.gene_ids[1, -1] == d.pad_token_id and batch.padding_mask[1, -1]
    assert batch.pert_flags[1, -1] == 2
    assert batch.pert_flags[0, :-1].sum() == 0
    with pytest.raises(ValueError, match=f"Unknown gene '{gene}'.*pass vocab"):
        from_gears_batch(x, y, [cond, "ctrl"], gene_names=d.gene_names)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda g: dict(g, x=g["x"][:-1]), "x must be"),
        (lambda g: dict(g, x=np.concatenate([g["x"]] * 3, axis=1)), "x must be"),
        (lambda g: dict(g, y=g["y"][:, :-1]), "y must be"),
        (lambda g: dict(g, pert=g["pert"][:-1]), "pert has"),
        (lambda g: dict(g, pert=["A+B+C"] + g["pert"][1:]), "Malformed"),
    ],
)
def test_shape_and_condition_errors(data_tiny, change, message):
    g = change(_gears_batch(data_tiny))
    with pytest.raises(ValueError, match=message):
        from_gears_batch(g["x"], g["y"], g["pert"], gene_names=data_tiny.gene_names)


def test_torch_tensors_are_accepted(data_tiny):
    torch = pytest.importorskip("torch")
    g = _gears_batch(data_tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = from_gears_batch(
            torch.tensor(g["x"]),
            torch.tensor(g["y"]),
            g["pert"],
            [torch.tensor(i) for i in g["pert_idx"]],
            g["pert_names"],
            gene_names=data_tiny.gene_names,
        )
    np.testing.assert_array_equal(batch.target_values, g["y"])
