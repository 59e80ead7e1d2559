import sys

from pyfici.cli import main

sys.exit(main())
