#!/usr/bin/env python
"""Relay load bench: Volli against peerjs-server and a bare flask-sock relay, same load and run.

Run from the repo root:  python bench/relay.py            (every figure, about 3 minutes)
                         python bench/relay.py --quick    (smoke run, about 35 seconds)
                         python bench/relay.py --help     (every option)

The code is the package bench/relaybench/ (see its __init__ and bench/README.md); this
script only runs it, so the documented command stays.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: machine, rawws, relaybench

from relaybench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
