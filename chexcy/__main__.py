import sys

from chexcy.cli import main

sys.exit(main())
