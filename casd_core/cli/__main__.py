"""``python -m casd_core.cli`` (how ``casd experiment --parallel`` starts its child runs)."""

import sys

from casd_core.cli import main

sys.exit(main())
