"""`python -m gapt ...` (also what `torchrun -m gapt train ...` runs)."""
import sys

from .cli import main

sys.exit(main())
