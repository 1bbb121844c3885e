"""``python -m offline.tiny_phi3 OUT_DIR [--preset tiny|bench]``: build or reuse a tiny Phi-3."""

import sys

from offline.tiny_phi3 import main

if __name__ == "__main__":
    sys.exit(main())
