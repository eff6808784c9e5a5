from expert_host.service import main
from shared.process import exit_now

exit_now(main())
