"""dist-tsp: Teacher-Student-Peer knowledge distillation on several processes."""

from tqdm import std as _tqdm_std

# Data loader workers are forked from the process that reads (a rank, or a protocol's or a sweep's run in its own
# process): no thread may be starting as they fork (a fork then can leave a worker blocked for ever in its first
# instant), so every tqdm bar of a dist-tsp process, ours and every library's (its subclasses read this), runs without
# the monitor thread that the first bar of each class would start.
_tqdm_std.tqdm.monitor_interval = 0
