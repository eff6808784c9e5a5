from gpu_worker.service import main
from shared.process import exit_now

exit_now(main())
