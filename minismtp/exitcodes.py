"""Exit statuses shared by the master, the workers and the command line."""

OK = 0
FAILURE = 1  # could not start: a port in use, an unusable delivery path
CONFIG = 2  # the configuration is invalid (each problem is printed)
WORKER_CRASHED = 3  # a worker died of an unexpected exception
WORKER_BOOT_FAILED = 4  # a worker could not set itself up (privileges, delivery)
