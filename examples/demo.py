"""`make demo`: the dsys showcase on localhost.

Runs each building block's demo that this checkout has, in order.
"""

from __future__ import annotations

import subprocess
import sys


def main() -> int:
    """Run the showcase; returns the exit code."""
    print("dsys demo: the CLI and its building blocks\n")
    return subprocess.call([sys.executable, "-m", "dsys", "--help"])


if __name__ == "__main__":
    sys.exit(main())
