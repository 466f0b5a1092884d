"""What ``pg-pitr`` accepts that the recovery itself also knows, in a module of its own: the
command line loads it to describe its options without loading the recovery code."""

# The recovered cluster's port when none is given: far from 5432, so it never meets production.
DEFAULT_PORT = 54329
# --to-time latest: replay all archived WAL.
LATEST = "latest"
