"""The kind's name and the keys of its copies' metadata that the kind reads back: apart from the
reader (``reader.py``: the tree's walk and GNU tar), which loads where a backup runs or a tree
is observed; reading the plan, ``list`` and ``wal-push`` need none of it."""

from __future__ import annotations

KIND_NAME = "config_archive"
# The manifest's lists of torn files, which changed while tar read them: those that shrank
# (tar padded them with zeros) and those that changed otherwise (grew or were rewritten: the
# copy holds as many bytes as tar found at the start, read while the file changed, so they
# may mix two versions). Neither is a state the file is known to have had.
TORN_FILES = "torn_files"
CHANGED_FILES = "changed_files"
