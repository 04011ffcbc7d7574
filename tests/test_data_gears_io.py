"""GEARS-format reading/writing, `prepare` for user AnnData, and every bad-input error."""

import os
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from scformer_jax.data.conditions import DataFormatError, parse_condition
from scformer_jax.data.dataset import load_dataset
from scformer_jax.data.gears_io import validate_gears_adata, write_h5ad_atomic
from scformer_jax.data.prepare import prepare

N_GENES = 12
LABELS = ["NT"] * 30 + ["G1"] * 10 + ["G2"] * 10 + ["G1_G2"] * 10 + ["G7"] * 8


def _counts_adata(seed=0, labels=LABELS):
    """Raw counts; G1 cells have gene G3 up 6-fold, G2 cells gene G5 down."""
    rng = np.random.default_rng(seed)
    rates = np.full((len(labels), N_GENES), 4.0)
    labels = np.asarray(labels)
    rates[np.isin(labels, ["G1", "G1_G2"]), 3] *= 6.0
    rates[np.isin(labels, ["G2", "G1_G2"]), 5] *= 0.1
    counts = rng.poisson(rates).astype(np.float32)
    obs = pd.DataFrame({"guide": labels}, index=[f"c{i}" for i in range(len(labels))])
    var = pd.DataFrame(index=[f"G{i}" for i in range(N_GENES)])
    return anndata.AnnData(X=sparse.csr_matrix(counts), obs=obs, var=var)


def _prepare(adata, **kwargs):
    options = dict(perturbation_key="guide", control_label="NT", combo_separator="_")
    options.update(kwargs)
    return prepare(adata, **options)


@pytest.fixture(scope="module")
def data_prepared():
    return _counts_adata(), _prepare(_counts_adata())


# ------------------------------------------------------------------ conditions


@pytest.mark.parametrize(
    "condition,genes", [("ctrl", ()), ("A+ctrl", ("A",)), ("ctrl+A", ("A",)), ("A+B", ("A", "B"))]
)
def test_parse_condition(condition, genes):
    assert parse_condition(condition) == genes


@pytest.mark.parametrize("condition", ["A", "A+", "+B", "A+B+C", "A+A", "ctrl+ctrl", "A +B", ""])
def test_parse_condition_rejects_malformed(condition):
    with pytest.raises(DataFormatError, match="Malformed condition"):
        parse_condition(condition)


# ------------------------------------------------------------------ prepare


def test_prepare_normalises_counts_and_builds_gears_columns(data_prepared):
    raw, out = data_prepared
    counts = raw.X.toarray().astype(np.float64)
    expected = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    np.testing.assert_allclose(out.X.toarray(), expected, rtol=1e-5, atol=1e-5)
    assert sparse.isspmatrix_csr(out.X) and out.X.dtype == np.float32
    mapping = {"NT": "ctrl", "G1": "G1+ctrl", "G2": "G2+ctrl", "G1_G2": "G1+G2", "G7": "G7+ctrl"}
    assert out.obs["condition"].astype(str).tolist() == [mapping[g] for g in LABELS]
    assert set(out.obs["cell_type"].astype(str)) == {"cell"}
    assert out.obs["condition_name"].astype(str).iloc[0] == "cell_ctrl_1"
    assert out.obs["condition_name"].astype(str).iloc[30] == "cell_G1+ctrl_1+1"
    assert out.var["gene_name"].tolist() == [f"G{i}" for i in range(N_GENES)]
    # The planted effects top the DE rankings.
    de = out.uns["rank_genes_groups_cov_all"]
    assert de["cell_G1+ctrl_1+1"][0] == "G3"
    assert de["cell_G2+ctrl_1+1"][0] == "G5"
    assert set(de["cell_G1+G2_1+1"][:2]) == {"G3", "G5"}
    assert "cell_ctrl_1" not in de
    # The input is untouched.
    assert "condition" not in raw.obs
    np.testing.assert_array_equal(raw.X.toarray(), _counts_adata().X.toarray())


def test_prepare_keeps_log_data_as_is():
    raw = _counts_adata()
    logged = raw.copy()
    logged.X = sparse.csr_matrix(np.log1p(raw.X.toarray() * 1.37))
    out = _prepare(logged)
    np.testing.assert_allclose(out.X.toarray(), logged.X.toarray(), rtol=1e-6)


def test_prepare_warns_about_unmeasured_perturbed_genes():
    labels = LABELS[:-8] + ["NOTMEASURED"] * 8
    with pytest.warns(UserWarning, match="NOTMEASURED"):
        out = _prepare(_counts_adata(labels=labels))
    assert "NOTMEASURED+ctrl" in set(out.obs["condition"].astype(str))


def test_gears_round_trip_folder_and_file(tmp_path, data_prepared):
    _, out = data_prepared
    folder = tmp_path / "mydata"
    write_h5ad_atomic(out, folder / "perturb_processed.h5ad")
    assert os.listdir(folder) == ["perturb_processed.h5ad"]
    for source in (folder, folder / "perturb_processed.h5ad"):
        data = load_dataset(source)
        np.testing.assert_array_equal(data.X.toarray(), out.X.toarray())
        assert list(data.cell_conditions) == out.obs["condition"].astype(str).tolist()
        assert list(data.gene_names) == [f"G{i}" for i in range(N_GENES)]
        # DE columns in rank order, from the stored names.
        ranked = out.uns["rank_genes_groups_cov_all"]["cell_G1+G2_1+1"]
        np.testing.assert_array_equal(data.de_rank["G1+G2"], [int(g[1:]) for g in ranked])
        np.testing.assert_array_equal(
            data.top_non_dropout_de_20["G1+ctrl"],
            [int(g[1:]) for g in out.uns["top_non_dropout_de_20"]["cell_G1+ctrl_1+1"]],
        )


# ------------------------------------------------------------------ bad input to prepare


def test_prepare_missing_column():
    with pytest.raises(DataFormatError, match="'guide2'"):
        _prepare(_counts_adata(), perturbation_key="guide2")


def test_prepare_missing_cell_type_and_gene_name_columns():
    with pytest.raises(DataFormatError, match="'tissue'"):
        _prepare(_counts_adata(), cell_type_key="tissue")
    with pytest.raises(DataFormatError, match="'symbol'"):
        _prepare(_counts_adata(), gene_name_key="symbol")


def test_prepare_no_control_cells():
    with pytest.raises(DataFormatError, match="No control cells.*'non-targeting'"):
        _prepare(_counts_adata(), control_label="non-targeting")


def test_prepare_malformed_label():
    labels = LABELS[:-8] + ["G1_G2_G3"] * 8
    with pytest.raises(DataFormatError, match="'G1_G2_G3'"):
        _prepare(_counts_adata(labels=labels))


def test_prepare_condition_with_one_cell():
    labels = LABELS[:-8] + ["G7"] * 7 + ["G9"]
    with pytest.raises(DataFormatError, match=r"'G9\+ctrl' \(1\)"):
        _prepare(_counts_adata(labels=labels))


def test_prepare_nan_values():
    raw = _counts_adata()
    dense = raw.X.toarray()
    dense[4, 2] = np.nan
    raw.X = sparse.csr_matrix(dense)
    with pytest.raises(DataFormatError, match="NaN/inf.*cell 4, gene column 2"):
        _prepare(raw)


def test_prepare_missing_labels():
    raw = _counts_adata()
    raw.obs.loc["c3", "guide"] = np.nan
    with pytest.raises(DataFormatError, match="missing for 1 cells"):
        _prepare(raw)


def test_prepare_counts_declared_as_log():
    with pytest.raises(DataFormatError, match="raw counts"):
        _prepare(_counts_adata(), normalize=False)


# ------------------------------------------------------------------ bad GEARS files


def _broken(data_prepared, fn):
    _, out = data_prepared
    broken = out.copy()
    fn(broken)
    return broken


@pytest.mark.parametrize("column", ["condition", "cell_type", "condition_name"])
def test_missing_obs_column(data_prepared, column):
    broken = _broken(data_prepared, lambda a: setattr(a, "obs", a.obs.drop(columns=[column])))
    with pytest.raises(DataFormatError, match=f"'{column}'.*prepare"):
        validate_gears_adata(broken)


def test_missing_gene_name(data_prepared):
    broken = _broken(data_prepared, lambda a: setattr(a, "var", a.var.drop(columns=["gene_name"])))
    with pytest.raises(DataFormatError, match="gene_name"):
        load_dataset(broken)


def test_missing_de_keys(data_prepared):
    broken = _broken(data_prepared, lambda a: a.uns.pop("top_non_dropout_de_20"))
    with pytest.raises(DataFormatError, match="top_non_dropout_de_20"):
        load_dataset(broken)
    # Without DE entries the data still load when DE is not required.
    data = load_dataset(broken, require_de=False)
    assert data.n_cells == len(LABELS)


def _renamed_condition(data_prepared, old, new):
    """A copy of the prepared data with condition `old` relabelled `new`."""

    def rename(a):
        conds = a.obs["condition"].astype(str).to_numpy().copy()
        conds[conds == old] = new
        a.obs["condition"] = conds

    return _broken(data_prepared, rename)


def test_malformed_condition_in_gears_file(data_prepared):
    with pytest.raises(DataFormatError, match="'G7\\+G8\\+G9'"):
        load_dataset(_renamed_condition(data_prepared, "G7+ctrl", "G7+G8+G9"))


def test_no_control_cells_in_gears_file(data_prepared):
    with pytest.raises(DataFormatError, match="No control cells"):
        load_dataset(_renamed_condition(data_prepared, "ctrl", "G1+ctrl"))


def test_small_conditions_in_gears_file(data_prepared):
    _, out = data_prepared
    keep = np.ones(out.n_obs, bool)
    keep[np.flatnonzero(out.obs["condition"].astype(str) == "G7+ctrl")[1:]] = False
    small = out[keep].copy()
    with pytest.raises(DataFormatError, match=r"'G7\+ctrl' \(1 cell\)"):
        load_dataset(small)
    with pytest.warns(UserWarning, match="Dropping 1 condition"):
        data = load_dataset(small, drop_small_conditions=True)
    assert "G7+ctrl" not in data.conditions


@pytest.mark.parametrize(
    "transform,message",
    [
        (lambda X: np.expm1(X), "un|counts"),
        (lambda X: X - 1.0, "negative values"),
        (lambda X: np.round(np.expm1(X) / 100), "raw counts"),
        (lambda X: np.where(np.arange(X.shape[1]) == 3, np.inf, X), "NaN/inf"),
    ],
)
def test_bad_values_in_gears_file(data_prepared, transform, message):
    def change(a):
        a.X = sparse.csr_matrix(transform(a.X.toarray()).astype(np.float32))

    with pytest.raises(DataFormatError, match=message):
        load_dataset(_broken(data_prepared, change))


def test_unknown_path_or_name():
    with pytest.raises(DataFormatError, match="neither an existing.*simulated:tiny"):
        load_dataset("/nonexistent/folder")
    with pytest.raises(DataFormatError, match="no perturb_processed.h5ad"):
        load_dataset(os.path.dirname(__file__))


def test_atomic_write_leaves_nothing_on_failure(tmp_path, data_prepared):
    _, out = data_prepared
    broken = out.copy()
    broken.uns["unwritable"] = object()
    target = tmp_path / "out.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # anndata raises its own error types (IORegistryError, TypeError by version).
        with pytest.raises(Exception):  # noqa: B017
            write_h5ad_atomic(broken, target)
    assert os.listdir(tmp_path) == []
