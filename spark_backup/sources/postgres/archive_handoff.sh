# archive_command of asynchronous WAL archiving (wal-pusher): hands a WAL file to the resident
# pusher and exits 0 only once the pusher says the store holds it. POSIX sh, no interpreter to
# start: the server calls it once per WAL file, so it must cost milliseconds.
#
#   archive_command = '/bin/sh SPOOL/archive-handoff.sh SPOOL TIMEOUT %p'
#
# SPOOL/requests/NAME  written here: the absolute path of the file (the pusher reads it there)
# SPOOL/acked/NAME     written by the pusher once the store holds NAME (it may push ahead of
#                      the server's call, from pg_wal/archive_status): consumed here
# SPOOL/failing        touched by the pusher when a push failed (a store outage): the call
#                      fails at once rather than waiting out TIMEOUT
# SPOOL/.lock          held by the running pusher: nobody holds it, nobody will push
#
# Any doubt exits non-zero: the server then keeps the file and calls again.
set -u
spool=$1
timeout=$2
path=$3
name=${path##*/}
case $path in /*) ;; *) path=$(pwd)/$path ;; esac

if [ -e "$spool/acked/$name" ]; then
  rm -f "$spool/acked/$name" && exit 0
fi
# A shared lock we can take means the pusher's exclusive one is not held: nobody pushes.
if command -v flock >/dev/null 2>&1 && flock -n -s "$spool/.lock" true 2>/dev/null; then
  echo "wal-pusher is not running on spool $spool: $name stays in pg_wal" >&2
  exit 3
fi
request="$spool/requests/$name"
printf '%s\n' "$path" >"$request.tmp.$$" && mv -f "$request.tmp.$$" "$request" || {
  rm -f "$request.tmp.$$"
  echo "cannot write a request into $spool/requests: $name stays in pg_wal" >&2
  exit 4
}
# Poll in steps of 5 ms, growing to 50 ms (sleep takes fractions on GNU and busybox).
waited=0
step=5
limit=$((timeout * 1000))
while [ "$waited" -lt "$limit" ]; do
  if [ -e "$spool/acked/$name" ]; then
    rm -f "$spool/acked/$name"
    exit 0
  fi
  if [ -e "$spool/failing" ] && [ "$spool/failing" -nt "$request" ]; then
    echo "wal-pusher could not store $name: $(head -c 400 "$spool/failing")" >&2
    exit 5
  fi
  sleep "0.$(printf '%03d' "$step")"
  waited=$((waited + step))
  [ "$step" -lt 50 ] && step=$((step + 5))
done
echo "wal-pusher did not store $name within $timeout s: it stays in pg_wal" >&2
exit 6
