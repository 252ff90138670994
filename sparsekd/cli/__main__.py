"""`python -m sparsekd.cli` = `sparsekd`."""
import sys

from sparsekd.cli import main

sys.exit(main())
