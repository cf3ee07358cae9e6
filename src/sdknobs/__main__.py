import sys

from sdknobs.cli import main

sys.exit(main())
