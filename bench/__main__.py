"""`python -m bench [--quick] [--out FILE]`: benchmark the proxy against its backends (see bench/run.py)."""

import sys

from bench.run import main

sys.exit(main())
