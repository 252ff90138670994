import sys

from sparsekd.cli import main

sys.exit(main())
