import sys

from carlos_audit.cli import main

sys.exit(main())
