import sys

from voxseg.cli import main

sys.exit(main())
