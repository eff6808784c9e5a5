import sys

from gpu_worker.service import main

sys.exit(main())
