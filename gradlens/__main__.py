"""``python -m gradlens`` (also what ``torchrun -m gradlens`` runs)."""

import sys

from .cli import main

sys.exit(main())
