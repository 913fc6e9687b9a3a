"""The seed's `python -m image_demo IMAGE CONFIG CHECKPOINT` (see `dida.image_demo`)."""

import sys

from dida.image_demo import main

if __name__ == "__main__":
    sys.exit(main())
