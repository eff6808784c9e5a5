import sys

from coordinator.service import main

sys.exit(main())
