"""How far any predictor can go on the simulated data, from the simulator's own truth.

    python bench/headroom.py    # simulated, shifted, shifted2, shifted3 and dev; seeds 1-3

Two questions, answered on the test perturbations of GEARS's simulation split:

* Unseen singles: how well does the control cells' co-expression predict a never-seen
  perturbation (the ``coexpression`` baseline: the regression of every gene on the perturbed
  one, in the direction the training singles mostly go), and how well with the true
  direction of that perturbation (knock-down or activation, which the simulator draws at
  random per gene and which no input carries)?
* Doubles: how close is the sum of the measured singles (``additive``) to the best
  prediction that does not know a double's interaction type? The simulator scales a
  double's downstream response by a random gain (additive, synergistic, buffering); the
  network's own joint response (gain 1) is its expectation. Beside it, the sum of the
  measured singles shrunk by their sampling error (``model.shrink_singles``, under the
  per-gene normal prior and under the adaptive mixture prior of ``model.shrink_prior``): how
  much of ``additive``'s error is the noise of the singles' means.
* Every subgroup: how far is the observed test profile (its own few dozen cells) from the
  truth, i.e. what would a perfect predictor score?

The truths come from simulations of the same network, perturbations and interactions with
``truth_cells`` cells per condition (2000; 20 times as many control cells), whose means are
close to the expectations: the true profile of every perturbation, the sum of the true
singles' changes, and the true joint response with every double additive. A same-seed
simulation with the same number of cells is not an independent replicate: each cell of it
gets the same intrinsic noise and efficiency draws as the cell in the same place of the
observed experiment (the cells' random streams depend only on the seed and the cells'
order), so it shares part of the observed profiles' sampling noise and scores too high.

Each row is the mean ``pearson_delta`` / ``pearson_de_delta`` over the test perturbations of
the subgroup in all the split seeds together. Nothing is trained: about a minute.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.quality import SIMULATED_FILES  # noqa: E402

DATASETS = {"simulated": (0, {}), **SIMULATED_FILES}


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / denominator) if denominator > 0 else float("nan")


TRUTH_CELLS = 2000


def _truth(settings: dict, sim_seed: int, cells: int, **changes):
    """A simulation of the same network with `cells` cells per condition (all conditions the
    same size; 20x as many control cells), whose condition means are near the expectations,
    and its doubles' interaction types.

    The network, the perturbations and the interactions are drawn before the condition sizes,
    so they are the same as in the observed simulation. The cells in the same place of the two
    simulations share their random draws, but the conditions' order differs: of a truth
    mean's cells, about one (of `cells`) shares its draws with a cell of the same observed
    condition.
    """
    from scformer_jax.data.dataset import load_dataset
    from scformer_jax.data.simulate import simulate, simulation_config, simulation_truth

    config = simulation_config(
        "default",
        **{
            **settings,
            **changes,
            "cells_per_condition": cells,
            "condition_size_sd": 0.0,
            "n_control_cells": 20 * cells,
        },
    )
    adata = simulate(config, seed=sim_seed)
    return load_dataset(adata), simulation_truth(adata)["interaction"]


def headroom(
    name: str, seeds: list[int], truth_cells: int = TRUTH_CELLS
) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(subgroup, predictor) -> per-perturbation (pearson_delta, pearson_de_delta)."""
    from scformer_jax.data.conditions import condition_genes
    from scformer_jax.data.dataset import load_dataset
    from scformer_jax.data.simulate import simulate, simulation_config, simulation_truth
    from scformer_jax.data.splits import gears_split
    from scformer_jax.prior import fit_additive_prior

    sim_seed, settings = DATASETS[name]
    adata = simulate(simulation_config("default", **settings), seed=sim_seed)
    mode = simulation_truth(adata)["perturbation_mode"]
    data = load_dataset(adata)
    truth, interactions = _truth(settings, sim_seed, truth_cells)
    joint, _ = _truth(settings, sim_seed, truth_cells, interaction_probs=(1.0, 0.0, 0.0))
    if interactions != simulation_truth(adata)["interaction"]:
        raise RuntimeError("The truth simulation drew other doubles or interactions.")
    ctrl = data.control_mean.astype(np.float64)

    def true_change(source, condition: str) -> np.ndarray:
        return source.condition_mean(condition) - source.control_mean.astype(np.float64)

    scores: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for seed in seeds:
        split = gears_split(data.conditions, split="simulation", seed=seed)
        subgroup_of = {c: g for g, members in split["subgroups"].items() for c in members}
        prior = fit_additive_prior(data, split["train"], coexpression=True)
        shrunk = fit_additive_prior(data, split["train"], shrink=True).changes
        adaptive = fit_additive_prior(
            data, split["train"], shrink=True, shrink_prior="adaptive"
        ).changes
        d = abs(prior.coexpression.direct_effect)
        for condition in split["test"]:
            if condition == "ctrl":
                continue
            genes = condition_genes(condition)
            true = data.condition_mean(condition) - ctrl
            de = data.de_indices(condition)
            predictions = {"true profile (perfect predictor)": true_change(truth, condition)}
            if len(genes) == 1:
                effect = prior.coexpression.effect(genes[0])
                if effect is None:
                    continue
                sign = 1.0 if mode[genes[0]] == "activation" else -1.0
                predictions["coexpression (training direction)"] = effect
                predictions["coexpression (true direction)"] = (
                    effect / prior.coexpression.direct_effect * d * sign
                )
            else:
                seen = [g for g in genes if g in prior.changes]
                if seen:
                    predictions["additive (measured singles)"] = sum(prior.changes[g] for g in seen)
                    predictions["additive (measured singles, shrunk)"] = sum(
                        shrunk[g] for g in seen
                    )
                    predictions["additive (measured singles, shrunk, adaptive prior)"] = sum(
                        adaptive[g] for g in seen
                    )
                singles = [f"{g}+ctrl" for g in genes]
                if all(single in truth.conditions for single in singles):
                    predictions["sum of the true singles"] = sum(
                        true_change(truth, single) for single in singles
                    )
                predictions["network joint response (true, every double additive)"] = true_change(
                    joint, condition
                )
            for predictor, change in predictions.items():
                scores.setdefault((subgroup_of[condition], predictor), []).append(
                    (_pearson(change, true), _pearson(change[de], true[de]))
                )
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    args = parser.parse_args(argv)
    for name in args.datasets:
        print(f"## {name} (split seeds {args.seeds})\n")
        print("| subgroup | predictor | n | pearson_delta | pearson_de_delta |")
        print("|---|---|---|---|---|")
        for (subgroup, predictor), values in sorted(headroom(name, args.seeds).items()):
            mean = np.nanmean(np.asarray(values), axis=0)
            print(f"| {subgroup} | {predictor} | {len(values)} | {mean[0]:.2f} | {mean[1]:.2f} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
