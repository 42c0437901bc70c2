import sys

from netrt.cli import main

sys.exit(main())
