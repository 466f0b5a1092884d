"""``python -m spark_backup`` and the ``spark-backup`` script.

Ctrl-C while the command line is still being imported (half a second, longer on a loaded host)
exits 130 like an interrupt anywhere else, not with a traceback and a death by SIGINT.
"""

import signal
import sys
from contextlib import suppress

INTERRUPTED = 130


def main() -> None:
    try:
        from spark_backup.cli import main as run

        run()
    except KeyboardInterrupt:
        with suppress(ValueError):  # outside the main thread there is no Ctrl-C to ignore
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second one does not cut this short
        sys.stderr.write("interrupted: nothing unfinished was published\n")
        sys.exit(INTERRUPTED)


if __name__ == "__main__":
    main()
