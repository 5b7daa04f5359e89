"""Import before `grpc`: keeps gRPC's fork support off in processes that start children with a fork hook.

`meshcni.sys.proc.spawn` (the lab, the tests) forks and runs a hook before exec; with gRPC's fork support
on, the child re-creates gRPC's poller thread, which then dies with "epoll_wait error: Bad file
descriptor" when the child closes inherited descriptors, and the child aborts before it ever execs. None of
our processes uses gRPC in a forked child, so the support is not needed; an explicit setting wins.
"""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
