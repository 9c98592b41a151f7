#!/usr/bin/env bash
# A stand-in batch scheduler for tests: start the job script as a separate background
# process and print its job id (a folder holding its output and, when done, its exit code).
set -euo pipefail
jobscript="${!#}"
dir=$(mktemp -d "${EMDENOISE_FAKE_QUEUE:-/tmp}/job.XXXXXX")
setsid bash -c 'bash "$1" > "$2/out" 2>&1; echo $? > "$2/rc.tmp"; mv "$2/rc.tmp" "$2/rc"' _ "$jobscript" "$dir" \
    < /dev/null > /dev/null 2>&1 &
echo "$dir"
