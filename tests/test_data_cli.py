"""`python -m scformer_jax.data simulate|prepare|split`: outputs and errors (nothing written)."""

import json
import os
import re
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from scformer_jax.data.__main__ import main
from scformer_jax.data.simulate import simulate
from scformer_jax.data.splits import gears_split


def test_simulate_writes_the_builtin_dataset(tmp_path, capsys):
    out = tmp_path / "sim.h5ad"
    assert main(["simulate", "--out", str(out), "--preset", "tiny", "--seed", "4"]) == 0
    assert "wrote" in capsys.readouterr().out
    written = anndata.read_h5ad(out)
    expected = simulate("tiny", seed=4)
    assert (written.X != expected.X).nnz == 0
    assert written.obs["condition"].tolist() == expected.obs["condition"].tolist()
    assert sorted(os.listdir(tmp_path)) == ["sim.h5ad"]


def test_simulate_overrides_and_errors(tmp_path, capsys):
    out = tmp_path / "small.h5ad"
    assert main(["simulate", "--out", str(out), "--preset", "tiny", "--set", "n_genes=30"]) == 0
    assert anndata.read_h5ad(out).n_vars == 30
    bad = tmp_path / "bad.h5ad"
    assert main(["simulate", "--out", str(bad), "--preset", "tiny", "--set", "n_gens=3"]) == 2
    assert "n_gens" in capsys.readouterr().err
    assert not bad.exists()


def _write_counts(path, labels):
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, (len(labels), 8)).astype(np.float32)
    adata = anndata.AnnData(
        X=sparse.csr_matrix(counts),
        obs=pd.DataFrame({"target": labels}, index=[f"c{i}" for i in range(len(labels))]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(8)]),
    )
    adata.write_h5ad(path)


def test_prepare_writes_a_gears_folder(tmp_path):
    source = tmp_path / "raw.h5ad"
    _write_counts(source, ["NT"] * 10 + ["G1"] * 5 + ["G2"] * 5 + ["G1+G2"] * 5)
    out_dir = tmp_path / "gears"
    assert (
        main(
            [
                "prepare",
                str(source),
                str(out_dir),
                "--perturbation-key",
                "target",
                "--control-label",
                "NT",
                "--cell-type",
                "K562",
            ]
        )
        == 0
    )
    result = anndata.read_h5ad(out_dir / "perturb_processed.h5ad")
    assert set(result.obs["condition"]) == {"ctrl", "G1+ctrl", "G2+ctrl", "G1+G2"}
    assert set(result.obs["condition_name"]) == {
        "K562_ctrl_1",
        "K562_G1+ctrl_1+1",
        "K562_G2+ctrl_1+1",
        "K562_G1+G2_1+1",
    }
    assert set(result.uns["rank_genes_groups_cov_all"]) == {
        "K562_G1+ctrl_1+1",
        "K562_G2+ctrl_1+1",
        "K562_G1+G2_1+1",
    }


@pytest.mark.parametrize(
    "args,labels,message",
    [
        (["--perturbation-key", "guide", "--control-label", "NT"], None, "'guide'"),
        (["--perturbation-key", "target", "--control-label", "ctrl"], None, "No control cells"),
        (
            ["--perturbation-key", "target", "--control-label", "NT"],
            ["NT"] * 10 + ["G1"] * 5 + ["G3"],
            "'G3\\+ctrl' \\(1\\)",
        ),
    ],
)
def test_prepare_errors_write_nothing(tmp_path, capsys, args, labels, message):
    source = tmp_path / "raw.h5ad"
    _write_counts(source, labels or ["NT"] * 10 + ["G1"] * 5)
    out = tmp_path / "out.h5ad"
    assert main(["prepare", str(source), str(out)] + args) == 2

    assert re.search(message, capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["raw.h5ad"]


def test_split_matches_gears_split(tmp_path, data_tiny_adata):
    data_path = tmp_path / "data.h5ad"
    data_tiny_adata.write_h5ad(data_path)
    out = tmp_path / "splits" / "split.json"
    assert (
        main(["split", str(data_path), "--split", "simulation", "--seed", "1", "--out", str(out)])
        == 0
    )
    written = json.loads(out.read_text())
    expected = gears_split(
        data_tiny_adata.obs["condition"].astype(str).tolist(), split="simulation", seed=1
    )
    for key in ("train", "val", "test"):
        assert written[key] == list(expected[key])
    assert written["subgroups"] == {k: list(v) for k, v in expected["subgroups"].items()}
    assert "ctrl" in written["train"]
    # The built-in name works too and gives the same conditions.
    out2 = tmp_path / "split2.json"
    assert main(["split", "simulated:tiny", "--out", str(out2)]) == 0
    assert json.loads(out2.read_text())["test"] == written["test"]


def test_split_errors_write_nothing(tmp_path, capsys, data_tiny_adata):
    data_path = tmp_path / "data.h5ad"
    data_tiny_adata.write_h5ad(data_path)
    out = tmp_path / "split.json"
    assert main(["split", str(data_path), "--split", "single", "--out", str(out)]) == 2
    assert "val" in capsys.readouterr().err
    assert main(["split", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["data.h5ad"]


def test_module_entry_point(tmp_path):
    out = tmp_path / "sim.h5ad"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "scformer_jax.data",
            "simulate",
            "--out",
            str(out),
            "--preset",
            "tiny",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert anndata.read_h5ad(out).n_vars == 40


def test_simulate_counts_writes_the_input_of_prepare(tmp_path, capsys):
    raw = tmp_path / "raw.h5ad"
    assert main(["simulate", "--out", str(raw), "--preset", "tiny", "--seed", "2", "--counts"]) == 0
    message = capsys.readouterr().out
    assert "raw UMI counts" in message and "prepare" in message
    counts = anndata.read_h5ad(raw).X.toarray()
    assert np.array_equal(counts, np.round(counts)) and counts.max() > 1
    prepared = tmp_path / "prepared.h5ad"
    common = ["--perturbation-key", "condition", "--control-label", "ctrl"]
    args = ["prepare", str(raw), str(prepared), "--chunked", "--cell-type-key", "cell_type"]
    assert main(args + common) == 0
    expected = simulate("tiny", seed=2)
    written = anndata.read_h5ad(prepared)
    np.testing.assert_allclose(written.X.toarray(), expected.X.toarray(), rtol=1e-6, atol=1e-6)
    assert (
        written.uns["top_non_dropout_de_20"].keys() == expected.uns["top_non_dropout_de_20"].keys()
    )
