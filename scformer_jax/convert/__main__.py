"""``python -m scformer_jax.convert TORCH_DIR OUT_DIR``: see :mod:`scformer_jax.convert`."""

import sys

from scformer_jax.convert.writing import main

sys.exit(main())
