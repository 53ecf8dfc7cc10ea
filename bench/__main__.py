"""``python -m bench``: run the benchmark suite (``--help`` for the options)."""

import sys

from .suite import main

if __name__ == "__main__":
    sys.exit(main())
