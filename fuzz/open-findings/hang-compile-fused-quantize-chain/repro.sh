#!/bin/sh
# Re-runs this finding's saved case through kiln and says whether it still shows (exit 1 if it does).
exec "${KILN:-kiln}" fuzz --replay "$(dirname "$0")" "$@"
