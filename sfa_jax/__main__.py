import sys

from sfa_jax.cli import main

sys.exit(main())
