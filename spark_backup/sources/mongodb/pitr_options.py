"""What ``mongo-pitr`` accepts that the restore itself also knows, in a module of its own: the
command line loads it to describe its options without loading the restore code (or pymongo)."""

# --to-time latest: replay the saved oplog to the end of its chain of slices.
LATEST = "latest"
