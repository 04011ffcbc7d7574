"""Data read from disk (backed) against the same data in memory: identical everywhere."""

import anndata
import h5py
import numpy as np
import pytest
from scipy import sparse

from scformer_jax.baselines import fit_baselines
from scformer_jax.data import BatchLoader, DataFormatError, gears_split, load_dataset, simulate
from scformer_jax.data.backed import BackedCSR, CSRWriter, x_nbytes
from scformer_jax.data.dataset import simulated_path, use_backed
from scformer_jax.data.de import group_stats
from scformer_jax.data.simulate import simulate_to_h5ad
from scformer_jax.evaluation import build_reference


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("backed") / "tiny.h5ad"
    simulate_to_h5ad("tiny", path, seed=3, workers=2)
    return path


@pytest.fixture(scope="module")
def pair(tiny_file):
    memory = load_dataset(tiny_file, backed=False)
    disk = load_dataset(tiny_file, backed=True, cache_bytes=20_000)
    return memory, disk


def test_chunked_simulation_writes_the_in_memory_dataset(tiny_file):
    expected = simulate("tiny", seed=3)
    written = anndata.read_h5ad(tiny_file)
    assert (expected.X != written.X).nnz == 0 and expected.X.shape == written.X.shape
    assert expected.obs.equals(written.obs) and expected.var.equals(written.var)
    assert sorted(expected.uns) == sorted(written.uns)
    for key, table in expected.uns.items():
        for name, value in table.items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(written.uns[key][name]))


def test_loaded_datasets_agree(pair):
    memory, disk = pair
    assert not memory.backed and disk.backed
    assert memory.conditions == disk.conditions
    for c in memory.conditions:
        np.testing.assert_array_equal(memory.condition_cells[c], disk.condition_cells[c])
        np.testing.assert_array_equal(memory.condition_mean(c), disk.condition_mean(c))
    np.testing.assert_array_equal(memory.control_mean, disk.control_mean)
    assert memory.de_rank.keys() == disk.de_rank.keys()
    for table in ("de_rank", "top_de_20", "non_zeros_gene_idx", "non_dropout_gene_idx"):
        a, b = getattr(memory, table), getattr(disk, table)
        assert set(a) == set(b) and len(a) > 0, table
        for c in a:
            np.testing.assert_array_equal(a[c], b[c])
    assert memory.top_non_dropout_de_20.keys() == disk.top_non_dropout_de_20.keys()
    c = next(iter(memory.de_rank))
    np.testing.assert_array_equal(memory.de_indices(c, 5), disk.de_indices(c, 5))
    with pytest.raises(KeyError, match="No DE genes"):
        disk.de_indices("ctrl")
    rng = np.random.default_rng(0)
    cells = rng.integers(0, memory.n_cells, 50)  # unsorted, with repeats
    np.testing.assert_array_equal(memory.dense_rows(cells), disk.dense_rows(cells))
    block = np.arange(10, 60)
    assert (memory.rows(block) != disk.rows(block)).nnz == 0


@pytest.mark.parametrize("mode", ["batch-wise", "all"])
def test_splits_pairing_and_batches_agree(pair, mode):
    memory, disk = pair
    split_m = gears_split(memory.conditions, "simulation", seed=1)
    split_d = gears_split(disk.conditions, "simulation", seed=1)
    assert split_m == split_d
    loaders = [
        BatchLoader(d, split_m["train"], batch_size=16, include_zero_gene=mode, seed=4)
        for d in (memory, disk)
    ]
    np.testing.assert_array_equal(loaders[0].pairing(1), loaders[1].pairing(1))
    for a, b in zip(loaders[0].epoch(1), loaders[1].epoch(1), strict=True):
        for field in a.batch.__dataclass_fields__:
            np.testing.assert_array_equal(getattr(a.batch, field), getattr(b.batch, field))
        np.testing.assert_array_equal(a.gene_index, b.gene_index)
        assert a.conditions == b.conditions


def test_reference_and_baselines_agree(pair):
    memory, disk = pair
    split = gears_split(memory.conditions, "simulation", seed=1)
    test = [c for c in split["test"] if c in memory.condition_cells][:4]
    refs = [build_reference(d, split["train"], test, seed=0) for d in (memory, disk)]
    for c in test:
        np.testing.assert_array_equal(refs[0].true_mean[c], refs[1].true_mean[c])
        np.testing.assert_array_equal(refs[0].true_cells[c], refs[1].true_cells[c])
    np.testing.assert_array_equal(refs[0].pert_ref, refs[1].pert_ref)
    preds = []
    for d in (memory, disk):
        train = {c: d.condition_mean(c) for c in split["train"] if c != "ctrl"}
        fitted = fit_baselines(
            train,
            d.control_mean,
            list(d.gene_names),
            control_expression=d.dense_rows(d.control_cells),
        )
        preds.append({name: b.predict(test) for name, b in fitted.items()})
    for name in preds[0]:
        for c in test:
            np.testing.assert_array_equal(preds[0][name][c], preds[1][name][c])


def test_group_stats_on_disk_equal_in_memory(tiny_file, pair):
    memory, _ = pair
    codes = np.arange(memory.n_cells) % 7
    codes[::5] = -1  # left out
    X = BackedCSR(tiny_file)
    try:
        for a, b in zip(
            group_stats(memory.X, codes, 7, chunk_rows=33), group_stats(X, codes, 7, chunk_rows=33)
        ):
            np.testing.assert_array_equal(a, b)
    finally:
        X.close()
    # Left-out cells do not count.
    counts, means, _ = group_stats(memory.X, codes, 7)
    assert counts.sum() == np.count_nonzero(codes >= 0)
    kept = codes == 2
    np.testing.assert_allclose(means[2], memory.X[kept].toarray().mean(axis=0), rtol=1e-6)


def test_row_cache_stays_bounded(tiny_file):
    X = BackedCSR(tiny_file, cache_bytes=3_000)
    try:
        X.dense_rows(np.arange(X.shape[0]))
        assert X.rows_read == X.shape[0]
        assert sum(d.nbytes + j.nbytes for d, j in X._cache.values()) <= 3_000
        last = X.shape[0] - 1
        X.dense_rows([last])  # the most recent row is cached
        assert X.rows_read == X.shape[0]
        X.dense_rows([0])  # the first was evicted
        assert X.rows_read == X.shape[0] + 1
    finally:
        X.close()


def test_auto_choice_and_bad_values(tiny_file):
    assert x_nbytes(tiny_file) > 0
    assert use_backed(tiny_file, "auto", above_gb=0.0)
    assert not use_backed(tiny_file, "auto", above_gb=1.0)
    assert load_dataset(tiny_file, backed="auto", backed_above_gb=0.0).backed
    with pytest.raises(ValueError, match="data.backed"):
        load_dataset(tiny_file, backed="yes")
    with pytest.raises(DataFormatError, match="AnnData in memory"):
        load_dataset(simulate("tiny"), backed=True)


def test_dense_x_cannot_be_read_backed(tmp_path):
    adata = simulate("tiny", seed=0)
    adata.X = adata.X.toarray()
    path = tmp_path / "dense.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(DataFormatError, match="not CSR"):
        load_dataset(path, backed=True)
    assert not load_dataset(path, backed="auto").backed


def test_builtin_name_backed_uses_the_cache(tmp_path):
    data = load_dataset("simulated:tiny", seed=2, backed=True, cache_dir=tmp_path)
    assert data.backed
    assert simulated_path("tiny", 2, None, tmp_path).exists()
    memory = load_dataset("simulated:tiny", seed=2)
    np.testing.assert_array_equal(memory.control_mean, data.control_mean)


@pytest.mark.parametrize("compress", [False, True])
def test_csr_writer_round_trip(tmp_path, compress):
    rng = np.random.default_rng(0)
    dense = rng.random((37, 11)).astype(np.float32)
    dense[dense < 0.6] = 0
    matrix = sparse.csr_matrix(dense)
    path = tmp_path / "x.h5ad"
    with h5py.File(path, "w") as f:
        writer = CSRWriter(f, 11, compress=compress)
        for start in (0, 10, 30):
            block = matrix[start : {0: 10, 10: 30, 30: 37}[start]]
            writer.append(block.data, block.indices, np.diff(block.indptr))
        assert writer.close() == 37
        assert f["X/data"].compression == ("gzip" if compress else None)
    X = BackedCSR(path)
    try:
        np.testing.assert_array_equal(X.dense_rows(np.arange(37)), dense)
        with pytest.raises(IndexError):
            X.dense_rows([37])
    finally:
        X.close()
    with h5py.File(tmp_path / "y.h5ad", "w") as f:
        writer = CSRWriter(f, 3)
        with pytest.raises(ValueError, match="disagree"):
            writer.append(np.ones(2, np.float32), np.zeros(2, np.int32), np.array([1]))


def _raw_counts(n_per=40, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.array(["NT"] * 60 + ["G1"] * n_per + ["G2"] * n_per + ["G1_G2"] * n_per)
    rates = np.full((len(labels), 15), 3.0)
    rates[np.isin(labels, ["G1", "G1_G2"]), 3] *= 5.0
    rates[np.isin(labels, ["G2", "G1_G2"]), 6] *= 0.2
    import pandas as pd

    obs = pd.DataFrame({"guide": labels}, index=[f"c{i}" for i in range(len(labels))])
    var = pd.DataFrame(index=[f"G{i}" for i in range(15)])
    X = sparse.csr_matrix(rng.poisson(rates).astype(np.float32))
    return anndata.AnnData(X=X, obs=obs, var=var)


@pytest.mark.parametrize("normalize", [None, False])
def test_chunked_prepare_writes_what_prepare_returns(tmp_path, normalize):
    from scformer_jax.data.prepare import prepare, prepare_h5ad

    raw = _raw_counts()
    if normalize is False:  # already log values
        raw.X = sparse.csr_matrix(np.log1p(raw.X.toarray()) * 0.5, dtype=np.float32)
    source = tmp_path / "raw.h5ad"
    raw.write_h5ad(source)
    options = dict(
        perturbation_key="guide", control_label="NT", combo_separator="_", normalize=normalize
    )
    expected = prepare(raw, de_backend="numpy", **options)
    out = prepare_h5ad(source, tmp_path / "out.h5ad", chunk_rows=17, **options)
    written = anndata.read_h5ad(out)
    assert (written.X != expected.X).nnz == 0
    assert written.obs.equals(expected.obs) and written.var.equals(expected.var)
    for key, table in expected.uns.items():
        assert table.keys() == written.uns[key].keys()
        for name, value in table.items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(written.uns[key][name]))


def test_chunked_prepare_refuses_bad_input_and_writes_nothing(tmp_path):
    from scformer_jax.data.prepare import prepare_h5ad

    raw = _raw_counts()
    raw.X = raw.X.toarray()
    raw.X[3, 2] = np.nan
    raw.X = sparse.csr_matrix(raw.X)
    source = tmp_path / "raw.h5ad"
    raw.write_h5ad(source)
    out = tmp_path / "out.h5ad"
    with pytest.raises(DataFormatError, match="NaN"):
        prepare_h5ad(source, out, perturbation_key="guide", control_label="NT")
    with pytest.raises(DataFormatError, match="guide_x"):
        prepare_h5ad(source, out, perturbation_key="guide_x", control_label="NT")
    assert not out.exists() and not list(tmp_path.glob(".out.h5ad*"))


def test_cli_prepare_chunked_equals_in_memory(tmp_path):
    from scformer_jax.data.__main__ import main

    source = tmp_path / "raw.h5ad"
    _raw_counts().write_h5ad(source)
    common = ["--perturbation-key", "guide", "--control-label", "NT", "--combo-separator", "_"]
    common += ["--de-backend", "numpy"]
    assert main(["prepare", str(source), str(tmp_path / "a.h5ad")] + common) == 0
    assert main(["prepare", str(source), str(tmp_path / "b.h5ad"), "--chunked"] + common) == 0
    a, b = (anndata.read_h5ad(tmp_path / n) for n in ("a.h5ad", "b.h5ad"))
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    np.testing.assert_array_equal(
        a.uns["rank_genes_groups_cov_all"]["cell_G1+ctrl_1+1"],
        b.uns["rank_genes_groups_cov_all"]["cell_G1+ctrl_1+1"],
    )


def test_group_stats_equal_a_direct_computation_with_multiple_chunks():
    rng = np.random.default_rng(4)
    dense = rng.poisson(0.7, (95, 13)).astype(np.float32) * rng.random((95, 13), np.float32)
    codes = rng.integers(-1, 6, 95)
    counts, means, variances = group_stats(sparse.csr_matrix(dense), codes, 7, chunk_rows=10)
    for g in range(7):
        rows = dense[codes == g].astype(np.float64)
        assert counts[g] == len(rows)
        if len(rows) == 0:
            assert not means[g].any() and not variances[g].any()
            continue
        np.testing.assert_allclose(means[g], rows.mean(axis=0), rtol=1e-12, atol=1e-12)
        expected = rows.var(axis=0, ddof=1) if len(rows) > 1 else np.zeros(13)
        np.testing.assert_allclose(variances[g], expected, rtol=1e-9, atol=1e-12)


def test_group_stats_of_a_non_canonical_matrix_leave_it_alone():
    # Unsorted column indices and a duplicated entry (row 0, column 2: 1 + 2 = 3).
    data = np.array([2.0, 1.0, 2.0, 4.0, 5.0], np.float32)
    indices = np.array([2, 0, 2, 1, 0], np.int32)
    matrix = sparse.csr_matrix((data, indices, np.array([0, 3, 5])), shape=(2, 3))
    before = (matrix.data.copy(), matrix.indices.copy())
    counts, means, variances = group_stats(matrix, np.array([0, 0]), 1)
    np.testing.assert_array_equal(means[0], [3.0, 2.0, 2.0])  # rows [1, 0, 4] and [5, 4, 0]
    np.testing.assert_allclose(variances[0], [8.0, 8.0, 8.0])
    np.testing.assert_array_equal(matrix.data, before[0])
    np.testing.assert_array_equal(matrix.indices, before[1])


def test_one_pass_drop_out_sets_equal_the_separate_pass():
    from scformer_jax.data.de import _rank_genes, dropout_gene_sets
    from scformer_jax.data.gears_io import condition_name

    adata = simulate("tiny", seed=5)
    ranked, name_means = _rank_genes(adata, backend="numpy", X=None, progress=False)
    assert name_means is not None and set(ranked) < set(name_means)
    shared = dropout_gene_sets(adata, ranked, name_means=name_means)
    separate = dropout_gene_sets(adata, ranked)
    assert shared.keys() == separate.keys()
    for key in shared:
        assert shared[key].keys() == separate[key].keys()
        for name in shared[key]:
            np.testing.assert_array_equal(shared[key][name], separate[key][name])
    # Two cell types: the condition means are not the per-condition_name means, so the
    # ranking does not hand them over.
    adata.obs["cell_type"] = np.where(np.arange(adata.n_obs) % 2, "a", "b")
    adata.obs["condition_name"] = [
        condition_name(t, c)
        for t, c in zip(adata.obs["cell_type"], adata.obs["condition"].astype(str))
    ]
    assert _rank_genes(adata, backend="numpy", X=None, progress=False)[1] is None


@pytest.fixture(scope="module")
def counts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("counts") / "tiny_counts.h5ad"
    simulate_to_h5ad("tiny", path, seed=3, workers=2, counts=True)
    return path


def test_counts_file_holds_the_draws_behind_the_dataset(counts_file):
    raw = anndata.read_h5ad(counts_file)
    expected = simulate("tiny", seed=3)  # no unmeasured genes: normalised over the same genes
    counts = raw.X.toarray()
    assert raw.X.dtype == np.float32 and np.array_equal(counts, np.round(counts))
    assert counts.max() > 1 and raw.shape == expected.shape
    totals = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    np.testing.assert_array_equal(
        np.log1p(counts * (np.float32(1e4) / totals)), expected.X.toarray()
    )
    assert raw.obs["condition"].tolist() == expected.obs["condition"].tolist()
    assert raw.var.equals(expected.var[["gene_name"]])
    assert list(raw.uns) == ["simulation"]  # no DE entries: prepare computes them
    assert sorted(raw.obs.columns) == ["cell_type", "condition"]
    with h5py.File(counts_file, "r") as f:  # read front to back only: stored compressed
        assert f["X/data"].compression == "gzip" and f["X/indices"].compression == "gzip"


def test_prepared_counts_file_is_the_simulated_dataset(counts_file, tmp_path):
    from scformer_jax.data.prepare import prepare_h5ad

    out = prepare_h5ad(
        counts_file,
        tmp_path / "prepared.h5ad",
        perturbation_key="condition",
        control_label="ctrl",
        cell_type_key="cell_type",
        chunk_rows=50,
    )
    prepared, expected = anndata.read_h5ad(out), simulate("tiny", seed=3)
    np.testing.assert_allclose(prepared.X.toarray(), expected.X.toarray(), rtol=1e-6, atol=1e-6)
    for column in ("condition", "condition_name", "cell_type", "control"):
        assert (
            prepared.obs[column].astype(str).tolist() == expected.obs[column].astype(str).tolist()
        )
    assert (
        prepared.uns["rank_genes_groups_cov_all"].keys()
        == expected.uns["rank_genes_groups_cov_all"].keys()
    )


def test_counts_file_keeps_only_the_measured_genes(tmp_path):
    from scformer_jax.data.simulate import simulation_config

    cfg = simulation_config("tiny", n_unmeasured_pert_genes=3)
    path = simulate_to_h5ad(cfg, tmp_path / "c.h5ad", seed=1, counts=True, workers=1)
    raw, expected = anndata.read_h5ad(path), simulate(cfg, seed=1)
    assert raw.shape == expected.shape and list(raw.var_names) == list(expected.var_names)
    # The simulator normalises over all genes (unmeasured ones too): the same non-zero
    # pattern, each cell's values a monotone function of its counts.
    assert (raw.X != 0).toarray().tolist() == (expected.X != 0).toarray().tolist()
    assert set(raw.uns["simulation"]["unmeasured_genes"]).isdisjoint(raw.var_names)
