#!/usr/bin/env bash
# Status of a job started by submit.sh: running | success | failed (Snakemake's protocol).
dir="$1"
if [ ! -f "$dir/rc" ]; then echo running
elif [ "$(cat "$dir/rc")" = 0 ]; then echo success
else echo failed
fi
