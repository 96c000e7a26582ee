#!/usr/bin/env bash
# encode-argv.sh ARG...: print the kernel parameter that makes ember-init run
# the command ARG... (the reference for ember's own encoder, see `init`).
#
#   $ ./encode-argv.sh echo hi ''
#   ember.argv=x6563686f,x6869,x
#
# Each argument becomes `x` + the lowercase hex of its bytes; fields are joined
# with `,`. With no ARG, prints nothing (ember-init then starts a shell).

set -euo pipefail

case "${1:-}" in
-h | --help) sed -n '2,9s/^# \{0,1\}//p' "$0"; exit 0 ;;
esac
[ $# -eq 0 ] && exit 0

fields=()
for arg in "$@"; do
	# od prints each byte as two lowercase hex digits; -v keeps repeated lines.
	fields+=("x$(printf '%s' "$arg" | od -An -v -tx1 | tr -d ' \n')")
done
(IFS=,; printf 'ember.argv=%s\n' "${fields[*]}")
