"""`python -m jax_infer.server [flags]`: the same as `jax-infer serve [flags]`."""

import sys

from jax_infer.server.cli import main

sys.exit(main([sys.argv[0], "serve", *sys.argv[1:]]))
