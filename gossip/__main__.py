import sys

from gossip.cli import main

sys.exit(main())
