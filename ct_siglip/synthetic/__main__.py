"""`python -m ct_siglip.synthetic ...`: the writer's CLI (`writer.main`)."""

import sys

from .writer import main

if __name__ == "__main__":
    sys.exit(main())
