import sys

from expert_host.service import main

sys.exit(main())
