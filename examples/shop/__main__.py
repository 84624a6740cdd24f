"""``python -m examples.shop``: run the shop on loopback (see :mod:`examples.shop.run`)."""

from __future__ import annotations

import sys

from .run import main

sys.exit(main())
