"""Why does a trained run predict what it predicts? Measures, for one run folder:

    python bench/diagnose.py runs/NAME [--max-cells 64]

1. **Fit**: ``pearson_delta`` of the model on its own *training* perturbations beside the
   test ones (a model that is poor on both underfits; good on train only, overfits), and the
   validation curve per epoch from ``metrics.jsonl``.
2. **Noise**: per perturbation, how large its mean shift is against the cell-to-cell spread
   of single cells: ``||mean change||^2 / mean_cells ||cell - condition mean||^2``. Below 1,
   one target cell is mostly noise around the shift that the metrics score.
3. **Collapse**: the mean pairwise Pearson correlation between the predicted changes of
   different test perturbations, beside the same for the observed changes (near 1 for the
   predictions and lower for the truth: the model predicts one change for everything).
4. **Direct effect**: the predicted change of each perturbed (measured) gene over its
   observed change (1 = the knock-down or activation of the named gene is reproduced).
5. **Doubles**: for the test doubles whose two singles were measured in training, how far
   the observed change is from the sum of the singles' measured changes (``additive``; root
   mean square over genes, median over doubles) beside the sampling error of that difference
   alone (the double's and the two singles' means, each its cells' variance over their
   number), and how far the model's prediction is from ``additive`` and how that correlates
   with the observed difference (the interaction the model predicts, with any shrinkage of
   the singles).

Prints one block of numbers; reads only the run folder and its dataset.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def mean_offdiagonal_correlation(changes: np.ndarray) -> float:
    """Mean Pearson correlation over distinct pairs of rows of (n, n_genes)."""
    if len(changes) < 2:
        return float("nan")
    corr = np.corrcoef(changes)
    return float(corr[~np.eye(len(changes), dtype=bool)].mean())


def diagnose(workdir: Path, max_cells: int = 64) -> dict:
    from scformer_jax.data.splits import read_split_json
    from scformer_jax.evaluation import model_profiles
    from scformer_jax.metrics import pearson
    from scformer_jax.predict import load_predictor

    predictor = load_predictor(str(workdir))
    data = predictor.dataset
    split = read_split_json(workdir / "split.json")
    ctrl = np.asarray(data.control_mean, np.float64)
    out: dict = {}
    groups = {name: [c for c in split[name] if c != "ctrl"] for name in ("train", "test")}
    predicted = {}
    for name, conditions in groups.items():
        pred = model_profiles(predictor, data, conditions, max_cells=max_cells)
        predicted[name] = pred
        out[f"{name}_pearson_delta"] = float(
            np.mean([pearson(pred[c] - ctrl, data.condition_mean(c) - ctrl) for c in conditions])
        )

    snr = []
    for c in groups["train"] + groups["test"]:
        cells = data.dense_rows(data.condition_cells[c]).astype(np.float64)
        mean = cells.mean(axis=0)
        spread = np.mean(np.sum((cells - mean) ** 2, axis=1))
        snr.append(np.sum((mean - ctrl) ** 2) / spread)
    out["shift_to_cell_noise_median"] = float(np.median(snr))
    out["shift_to_cell_noise_range"] = (float(np.min(snr)), float(np.max(snr)))

    test = groups["test"]
    pred_changes = np.stack([predicted["test"][c] - ctrl for c in test])
    true_changes = np.stack([data.condition_mean(c) - ctrl for c in test])
    out["collapse_predicted"] = mean_offdiagonal_correlation(pred_changes)
    out["collapse_observed"] = mean_offdiagonal_correlation(true_changes)

    ratios = []
    for c in test:
        for gene in data.condition_genes[c]:
            col = data.column_of(gene)
            observed = data.condition_mean(c)[col] - ctrl[col] if col >= 0 else 0.0
            if col >= 0 and abs(observed) > 0.2:
                ratios.append((predicted["test"][c][col] - ctrl[col]) / observed)
    out["direct_effect_ratio_median"] = float(np.median(ratios)) if ratios else None
    out["direct_effect_n"] = len(ratios)

    def mean_and_error(condition):
        """A condition's mean and its squared standard error per gene (float64)."""
        n = len(data.condition_cells[condition])
        mean, square = data.expression_moments(data.condition_cells[condition])
        return mean, square / max(n - 1, 1) / n

    singles = {
        data.condition_genes[c][0]: c for c in groups["train"] if len(data.condition_genes[c]) == 1
    }
    observed_rms, noise_rms, model_rms, agreement = [], [], [], []
    for c in test:
        genes = data.condition_genes[c]
        if len(genes) != 2 or not all(g in singles for g in genes):
            continue
        true_mean, error = mean_and_error(c)
        additive = ctrl.copy()
        for g in genes:
            single_mean, single_error = mean_and_error(singles[g])
            additive += single_mean - ctrl
            error += single_error
        observed, model = true_mean - additive, predicted["test"][c] - additive
        observed_rms.append(np.sqrt(np.mean(observed**2)))
        noise_rms.append(np.sqrt(np.mean(error)))
        model_rms.append(np.sqrt(np.mean(model**2)))
        agreement.append(pearson(model, observed))
    out["doubles_n"] = len(observed_rms)
    if observed_rms:
        out["doubles_observed_minus_additive_rms"] = float(np.median(observed_rms))
        out["doubles_sampling_error_rms"] = float(np.median(noise_rms))
        out["doubles_model_minus_additive_rms"] = float(np.median(model_rms))
        out["doubles_model_vs_observed_difference_corr"] = float(np.mean(agreement))

    curve = []
    path = workdir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "epoch":
                curve.append(round(float(record.get("val_pearson_delta", float("nan"))), 3))
    out["val_pearson_delta_by_epoch"] = curve
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument(
        "--max-cells",
        type=int,
        default=64,
        help="cells predicted per perturbation (fewer is faster)",
    )
    args = parser.parse_args(argv)
    result = diagnose(args.workdir, max_cells=args.max_cells)
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
