"""Helper of test_training_loop: one train step on a fixed global batch, in 1 or N processes.

Run as a script (not collected by pytest). Writes the updated parameters to --out.
"""

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--coordinator-address")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args()

    import jax
    import numpy as np

    from scformer_jax import parallel
    from scformer_jax.config import ObjectiveConfig, OptimConfig
    from scformer_jax.model import TransformerGenerator
    from scformer_jax.training import create_train_state, train_step
    from tests.tiny_model import TRAIN_STEP_MODEL, random_batch

    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    assert jax.device_count() == 2, jax.devices()
    model_config = TRAIN_STEP_MODEL
    objective = ObjectiveConfig(cce=True)
    state, _ = create_train_state(model_config, OptimConfig(), 10, jax.random.PRNGKey(0))
    p_step = parallel.pmap(
        functools.partial(train_step, model=TransformerGenerator(model_config), objective=objective)
    )
    batch = random_batch(batch=8, n_pad_rows=1)
    new_state, metrics = p_step(
        parallel.replicate(state),
        parallel.shard_batch(batch),
        parallel.replicate(jax.random.PRNGKey(1)),
    )
    params = parallel.unreplicate(new_state.params)
    flat = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
    flat["loss"] = np.asarray(parallel.unreplicate(metrics["loss"]))
    np.savez(args.out, **flat)


if __name__ == "__main__":
    main()
