"""``python -m dsys`` runs the CLI."""

import sys

from dsys.cli import main

sys.exit(main())
