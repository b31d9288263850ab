import sys

from sparsecl.cli import main

sys.exit(main())
