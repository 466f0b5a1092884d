#!/usr/bin/env bash
# The tools the benchmarks compare spark-backup with, from Debian's packages: the shell pipeline
# (tar, zstd, age), restic, GNU time (peak RSS) and the PostgreSQL 15 server binaries with
# pgbench (the dump benchmark; bench_postgres.py also needs runuser from util-linux), and
# pgBackRest (bench_wal_push.py compares wal-pusher with its archive-push --archive-async,
# bench_pitr.py point-in-time recovery with its restore --type=time).
# Installs only what is missing; run as root or with sudo.
set -euo pipefail

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

declare -A package=(
  [tar]=tar [zstd]=zstd [age]=age [age-keygen]=age [restic]=restic [runuser]=util-linux
  [/usr/bin/time]=time [/usr/lib/postgresql/15/bin/pgbench]=postgresql-15
  [pgbackrest]=pgbackrest [flock]=util-linux
)
missing=()
for tool in "${!package[@]}"; do
  command -v "$tool" >/dev/null || missing+=("${package[$tool]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi
echo "benchmark tools present: ${!package[*]}"
