"""`python -m trainer <stage> ...` (what torchrun launches in the pods)."""

import sys

from trainer.cli import main

sys.exit(main())
