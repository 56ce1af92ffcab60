"""`python -m llama3_jax.cli`: the same commands as the `llama3-jax` script."""

import sys

from . import main

sys.exit(main())
