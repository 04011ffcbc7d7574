"""Control pairing and fixed-shape two-channel batches, checked against NumPy on X."""

import numpy as np
import pytest

from scformer_jax.data.batching import BatchLoader, assemble_batch, bucket_sizes
from scformer_jax.data.dataset import PerturbData


def _dense(data):
    return data.X.toarray()


def _real_rows(host):
    return range(host.n_real)


def _check_values(data, host):
    """Channels and targets equal X at each token's column; 0 for unmeasured tokens."""
    X = _dense(data)
    b = host.batch
    for r in _real_rows(host):
        real = ~b.padding_mask[r]
        cols = host.gene_index[r, real]
        measured = cols >= 0
        np.testing.assert_array_equal(
            b.control_values[r, real][measured], X[host.control_indices[r], cols[measured]]
        )
        np.testing.assert_array_equal(
            b.target_values[r, real][measured], X[host.cell_indices[r], cols[measured]]
        )
        assert np.all(b.control_values[r, real][~measured] == 0)
        # Token ids are gene ids: a measured token's id is its column.
        np.testing.assert_array_equal(b.gene_ids[r, real][measured], cols[measured])
        assert np.all(b.gene_ids[r, ~real] == data.pad_token_id)
        assert np.all(b.pert_flags[r, ~real] == 2)
        assert np.all(host.gene_index[r, ~real] == -1)


def _check_flags(data, host):
    b = host.batch
    for r in _real_rows(host):
        real = ~b.padding_mask[r]
        flagged = set(b.gene_ids[r, real][b.pert_flags[r, real] == 1].tolist())
        genes = data.condition_genes[host.conditions[r]]
        assert flagged == {data.vocab[g] for g in genes}, host.conditions[r]
        assert set(np.unique(b.pert_flags[r, real])) <= {0.0, 1.0}


def test_epoch_covers_every_cell_once_and_pads_the_last_batch(data_tiny):
    train = [c for c in data_tiny.conditions][:10]
    loader = BatchLoader(data_tiny, train, batch_size=32, seed=0)
    n = len(loader.cell_indices)
    assert n % 32 != 0 and len(loader) == -(-n // 32)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader)
    seen = np.concatenate([h.cell_indices[: h.n_real] for h in batches])
    np.testing.assert_array_equal(np.sort(seen), loader.cell_indices)
    last = batches[-1]
    assert last.n_real == n % 32
    np.testing.assert_array_equal(
        last.batch.cell_weights, (np.arange(32) < last.n_real).astype(np.float32)
    )
    assert last.conditions[last.n_real :] == [""] * (32 - last.n_real)
    assert np.all(last.cell_indices[last.n_real :] == -1)
    assert {h.batch.gene_ids.shape for h in batches} == {(32, data_tiny.n_genes)}
    for h in batches:
        h.batch.check()
        real = h.cell_indices[: h.n_real]
        assert h.conditions[: h.n_real] == list(data_tiny.cell_conditions[real])
        _check_values(data_tiny, h)
        _check_flags(data_tiny, h)


def test_pairing_controls_map_to_themselves_redrawn_or_frozen(data_tiny):
    loader = BatchLoader(data_tiny, data_tiny.conditions, batch_size=16, seed=5)
    cells = loader.cell_indices
    is_ctrl = data_tiny.cell_conditions[cells] == "ctrl"
    p0, p1 = loader.pairing(0), loader.pairing(1)
    np.testing.assert_array_equal(p0[is_ctrl], cells[is_ctrl])
    assert np.all(np.isin(p0[~is_ctrl], data_tiny.control_cells))
    assert np.any(p0 != p1)  # the default: re-drawn every epoch
    np.testing.assert_array_equal(
        p0, BatchLoader(data_tiny, data_tiny.conditions, batch_size=16, seed=5).pairing(0)
    )
    assert np.any(
        p0 != BatchLoader(data_tiny, data_tiny.conditions, batch_size=16, seed=6).pairing(0)
    )
    frozen = BatchLoader(
        data_tiny, data_tiny.conditions, batch_size=16, seed=5, frozen_pairing=True
    )
    # GEARS's fixed pairing: one control per perturbed cell, the same in every epoch.
    np.testing.assert_array_equal(frozen.pairing(0), frozen.pairing(7))
    assert np.all(np.isin(frozen.pairing(0)[~is_ctrl], data_tiny.control_cells))
    # The batches use the epoch's pairing.
    host = next(frozen.epoch(3))
    position = np.searchsorted(cells, host.cell_indices[: host.n_real])
    np.testing.assert_array_equal(host.control_indices[: host.n_real], frozen.pairing(3)[position])


def test_drop_last_serves_only_full_batches(data_tiny):
    n = len(BatchLoader(data_tiny, data_tiny.conditions, batch_size=32).cell_indices)
    assert n % 32, "the tiny dataset must leave a partial batch for this test"
    loader = BatchLoader(data_tiny, data_tiny.conditions, batch_size=32, seed=3, drop_last=True)
    assert len(loader) == n // 32
    for epoch in (0, 1):
        batches = list(loader.epoch(epoch))
        assert len(batches) == n // 32 and all(h.n_real == 32 for h in batches)
        served = np.concatenate([h.cell_indices for h in batches])
        assert len(np.unique(served)) == 32 * (n // 32)
        # The cells left out are the last of this epoch's shuffled order.
        left_out = loader.cell_indices[loader.order(epoch)[32 * (n // 32) :]]
        assert not np.isin(left_out, served).any()
    with pytest.raises(ValueError, match="drop_last leaves no batch.*lower the batch size"):
        BatchLoader(data_tiny, data_tiny.conditions, batch_size=n + 1, drop_last=True)


def test_pairing_stays_within_cell_type(data_tiny_adata):
    adata = data_tiny_adata.copy()
    adata.obs["cell_type"] = np.where(np.arange(adata.n_obs) % 2 == 0, "A", "B")
    data = PerturbData(adata, require_de=False)
    loader = BatchLoader(data, data.conditions, batch_size=8, seed=0)
    partners = loader.pairing(0)
    np.testing.assert_array_equal(data.cell_types[partners], data.cell_types[loader.cell_indices])
    assert np.all(np.isin(partners, data.control_cells))


def test_deterministic_and_resumable(data_tiny):
    def make():
        return BatchLoader(
            data_tiny,
            data_tiny.conditions,
            batch_size=16,
            seed=3,
            include_zero_gene="row-wise",
            max_seq_len=24,
        )

    first, second = list(make().epoch(2)), list(make().epoch(2))
    resumed = list(make().epoch(2, start_batch=4))
    assert len(resumed) == len(first) - 4
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.batch.inputs, b.batch.inputs)
        np.testing.assert_array_equal(a.batch.gene_ids, b.batch.gene_ids)
    for a, b in zip(first[4:], resumed):
        np.testing.assert_array_equal(a.cell_indices, b.cell_indices)
        np.testing.assert_array_equal(a.batch.gene_ids, b.batch.gene_ids)
        np.testing.assert_array_equal(a.batch.target_values, b.batch.target_values)
    other_epoch = list(make().epoch(3))
    assert any(np.any(a.cell_indices != b.cell_indices) for a, b in zip(first, other_epoch))
    unshuffled = BatchLoader(data_tiny, data_tiny.conditions, batch_size=16, shuffle=False)
    np.testing.assert_array_equal(
        next(unshuffled.epoch(0)).cell_indices, unshuffled.cell_indices[:16]
    )


@pytest.mark.parametrize("mode", ["batch-wise", "row-wise", "nonzero"])
def test_gene_selection_modes(data_tiny, mode):
    X = _dense(data_tiny)
    loader = BatchLoader(
        data_tiny, data_tiny.conditions, batch_size=16, seed=1, include_zero_gene=mode
    )
    for host in list(loader.epoch(0))[:6]:
        rows = list(_real_rows(host))
        ctrl = X[host.control_indices[rows]]
        pert_cols = [
            {data_tiny.column_of(g) for g in data_tiny.condition_genes[host.conditions[r]]}
            for r in rows
        ]
        for r in rows:
            got = set(host.gene_index[r][host.gene_index[r] >= 0].tolist())
            if mode == "batch-wise":
                expected = set(np.flatnonzero(ctrl.any(axis=0) != 0)) | set().union(*pert_cols)
            else:
                # Never chosen by the target cell: that would leak the answer.
                expected = set(np.flatnonzero(ctrl[r] != 0)) | pert_cols[r]
            assert got == expected
        _check_values(data_tiny, host)
        _check_flags(data_tiny, host)


@pytest.mark.parametrize(
    "mode,max_len", [("all", 10), ("batch-wise", 12), ("row-wise", 6), ("nonzero", 5)]
)
def test_sampling_keeps_perturbed_genes_and_samples_gene_ids(data_tiny, mode, max_len):
    loader = BatchLoader(
        data_tiny,
        data_tiny.conditions,
        batch_size=4,
        seed=2,
        include_zero_gene=mode,
        max_seq_len=max_len,
    )
    X = _dense(data_tiny)
    used = set()
    for host in loader.epoch(0):
        b = host.batch
        assert b.gene_ids.shape[1] <= max_len
        batch_pert = {
            data_tiny.vocab[g]
            for r in _real_rows(host)
            for g in data_tiny.condition_genes[host.conditions[r]]
        }
        for r in _real_rows(host):
            real = ~b.padding_mask[r]
            tokens = set(b.gene_ids[r, real].tolist())
            assert real.sum() <= max_len
            mine = {data_tiny.vocab[g] for g in data_tiny.condition_genes[host.conditions[r]]}
            assert mine <= tokens
            if mode in ("all", "batch-wise"):
                assert batch_pert <= tokens
            sampled = tokens - batch_pert
            used |= sampled
            # Sampled genes come from the mode's candidates (here: non-zero genes).
            cols = np.array(sorted(sampled))
            if mode in ("nonzero", "row-wise"):
                assert np.all(X[host.control_indices[r], cols] != 0)
        _check_values(data_tiny, host)
        _check_flags(data_tiny, host)
    # Sampling draws gene ids from the whole gene range, not positions 0..max_len-1.
    assert max(used) >= 2 * max_len and len(used) > 2 * max_len


def test_unmeasured_gene_is_an_extra_token(data_tiny_unmeasured):
    d = data_tiny_unmeasured
    gene = d.unmeasured_genes[0]
    token = d.vocab[gene]
    conditions = [c for c in d.conditions if gene in d.condition_genes[c]] + ["ctrl"]
    for mode in ("all", "row-wise"):
        loader = BatchLoader(d, conditions, batch_size=8, seed=0, include_zero_gene=mode)
        assert loader.bucket_sizes[-1] == d.n_genes + 1
        found = 0
        for host in loader.epoch(0):
            b = host.batch
            for r in _real_rows(host):
                at = np.flatnonzero(b.gene_ids[r] == token)
                if gene in d.condition_genes[host.conditions[r]]:
                    assert len(at) == 1
                    j = at[0]
                    assert b.pert_flags[r, j] == 1 and not b.padding_mask[r, j]
                    assert b.control_values[r, j] == 0 and host.gene_index[r, j] == -1
                    found += 1
                else:
                    assert np.all(b.pert_flags[r, at] == 0)
            _check_values(d, host)
            _check_flags(d, host)
        assert found == sum(len(d.condition_cells[c]) for c in conditions if c != "ctrl")


def test_static_shapes_from_a_few_buckets(data_tiny):
    assert bucket_sizes(150, 4) == (40, 80, 120, 150)
    assert bucket_sizes(10, 4) == (8, 10)
    loader = BatchLoader(
        data_tiny,
        data_tiny.conditions,
        batch_size=4,
        seed=0,
        include_zero_gene="nonzero",
        length_buckets=3,
    )
    assert loader.bucket_sizes == bucket_sizes(data_tiny.n_genes, 3)
    shapes = set()
    for host in loader.epoch(0):
        longest = int((~host.batch.padding_mask).sum(axis=1).max())
        length = host.batch.gene_ids.shape[1]
        assert length in loader.bucket_sizes
        assert length == min(b for b in loader.bucket_sizes if b >= longest)
        shapes.add(host.batch.gene_ids.shape)
    assert 1 <= len(shapes) <= 3
    explicit = BatchLoader(
        data_tiny,
        data_tiny.conditions,
        batch_size=4,
        include_zero_gene="row-wise",
        length_buckets=[16, 40],
    )
    assert {h.batch.gene_ids.shape[1] for h in explicit.epoch(0)} <= {16, 40}
    all_mode = BatchLoader(data_tiny, data_tiny.conditions, batch_size=4)
    assert all_mode.bucket_sizes == (data_tiny.n_genes,)


def test_assemble_batch_for_an_arbitrary_condition(data_tiny):
    genes = sorted({g for c in data_tiny.conditions for g in data_tiny.condition_genes[c]})
    condition = f"{genes[0]}+{genes[1]}"
    controls = data_tiny.control_cells[:3]
    host = assemble_batch(data_tiny, controls, controls, conditions=[condition] * 3, batch_size=4)
    assert host.conditions == [condition] * 3 + [""]
    flagged = host.batch.gene_ids[0][host.batch.pert_flags[0] == 1]
    assert sorted(flagged.tolist()) == sorted(data_tiny.vocab[g] for g in genes[:2])
    assert host.batch.cell_weights.tolist() == [1, 1, 1, 0]


def test_bad_loader_arguments(data_tiny):
    with pytest.raises(ValueError, match="'Z\\+ctrl'"):
        BatchLoader(data_tiny, ["Z+ctrl"], batch_size=4)
    with pytest.raises(ValueError, match="include_zero_gene"):
        BatchLoader(data_tiny, ["ctrl"], batch_size=4, include_zero_gene="some")
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(data_tiny, ["ctrl"], batch_size=0)
    with pytest.raises(ValueError, match="max_seq_len 1 is below"):
        BatchLoader(
            data_tiny,
            data_tiny.conditions,
            batch_size=4,
            max_seq_len=1,
            include_zero_gene="row-wise",
        )
    with pytest.raises(ValueError, match="largest length bucket"):
        BatchLoader(data_tiny, data_tiny.conditions, batch_size=4, length_buckets=[8])
    with pytest.raises(ValueError, match="at least one condition"):
        BatchLoader(data_tiny, [], batch_size=4)


def test_unmeasured_perturbed_gene_tokens_have_no_target(data_tiny_unmeasured):
    data = data_tiny_unmeasured
    assert len(data.unmeasured_genes) == 1
    gene = data.unmeasured_genes[0]
    conditions = [c for c in data.conditions if gene in data.condition_genes[c]]
    loader = BatchLoader(data, conditions, batch_size=8, seed=0)
    host = next(iter(loader.epoch(0)))
    batch = host.batch
    extra = (host.gene_index == -1) & ~batch.padding_mask
    assert extra[: host.n_real].any()
    assert np.all(batch.pert_flags[extra] == 1)
    assert not batch.target_mask[extra].any()
    assert np.all(batch.loss_mask[extra] == 0)
    measured = (host.gene_index >= 0)[: host.n_real]
    assert np.all(batch.loss_mask[: host.n_real][measured] == 1)


def _threaded_shares(loader_kwargs, data, count, epoch=0):
    """Each of `count` threads plays one process: a loader with its ProcessShare, exchanging
    through a barrier. Returns per process (batches, cells read)."""
    import threading

    from scformer_jax.data.batching import ProcessShare

    barrier = threading.Barrier(count)
    slots: list = [None] * count
    reads: dict[int, list] = {i: [] for i in range(count)}
    who = threading.local()
    dense_rows = data.dense_rows

    def recording(cells):
        reads[who.index].extend(np.asarray(cells).tolist())
        return dense_rows(cells)

    def exchange_for(index):
        def exchange(local):
            slots[index] = np.array(local)
            barrier.wait()
            out = [np.array(s) for s in slots]
            barrier.wait()
            return out

        return exchange

    results: list = [None] * count
    errors = []

    def run(index):
        who.index = index
        try:
            share = ProcessShare(index=index, count=count, exchange=exchange_for(index))
            loader = BatchLoader(data, share=share, **loader_kwargs)
            results[index] = list(loader.epoch(epoch))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    data.dense_rows = recording
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del data.dense_rows
    assert not errors, errors
    return results, reads


@pytest.mark.parametrize(
    "mode, max_len",
    [("batch-wise", None), ("batch-wise", 12), ("all", None), ("row-wise", 10)],
)
def test_process_shares_equal_the_whole_batch_and_read_only_their_cells(data_tiny, mode, max_len):
    count, batch = 4, 8
    train = [c for c in data_tiny.conditions if c != "ctrl"][:6] + ["ctrl"]
    kwargs = dict(
        conditions=train,
        batch_size=batch,
        include_zero_gene=mode,
        max_seq_len=max_len,
        seed=3,
        frozen_pairing=False,
    )
    whole = list(BatchLoader(data_tiny, **kwargs).epoch(0))
    # The last batch leaves a share without real rows.
    assert whole[-1].n_real <= batch - batch // count
    shares, reads = _threaded_shares(kwargs, data_tiny, count)
    rows = batch // count
    for p in range(count):
        assert len(shares[p]) == len(whole)
        mine = set()
        for host, full in zip(shares[p], whole):
            lo = p * rows
            real = max(0, min(rows, full.n_real - lo))
            assert host.n_real == real
            for name in ("gene_ids", "control_values", "pert_flags", "target_values"):
                got = np.asarray(getattr(host.batch, name))[:real]
                want = np.asarray(getattr(full.batch, name))[lo : lo + real]
                np.testing.assert_array_equal(got, want, err_msg=f"{mode} {name}")
            assert (
                np.asarray(host.batch.gene_ids).shape[1] == np.asarray(full.batch.gene_ids).shape[1]
            )
            np.testing.assert_array_equal(
                host.cell_indices[:real], full.cell_indices[lo : lo + real]
            )
            weights = np.asarray(host.batch.cell_weights)
            assert weights[:real].tolist() == [1.0] * real and not weights[real:].any()
            mine |= set(full.cell_indices[lo : lo + real].tolist())
            mine |= set(full.control_indices[lo : lo + real].tolist())
            if real == 0:  # padded from the batch's first row: one pair read
                mine |= {int(full.cell_indices[0]), int(full.control_indices[0])}
        # Only the share's own cells are read (the whole batches read every cell).
        assert set(reads[p]) <= mine
        other = set().union(
            *(
                set(full.cell_indices[q * rows : (q + 1) * rows].tolist())
                for full in whole
                for q in range(count)
                if q != p
            )
        ) - {-1}
        assert len(set(reads[p])) < len(set(reads[p]) | other)
