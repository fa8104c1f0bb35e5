#!/usr/bin/env bash
# Checks the krew manifest with krew's own validator (sigs.k8s.io/krew
# cmd/validate-krew-manifest, built once into .lab/bin, cached by version):
#   1. kubectl-guestcred/krew/guestcred.yaml as committed (placeholder uri/sha256):
#      structure, platforms, selectors (-skip-install);
#   2. with a directory of built binaries (usually target/debug): the same manifest
#      rendered for one linux/amd64 archive made from them, served on 127.0.0.1, installed
#      by the validator (download, sha256, unpack, bin present).
# Usage: kubectl-guestcred/krew/validate.sh [BIN_DIR]
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
manifest="$repo/kubectl-guestcred/krew/guestcred.yaml"
# v0.4.5's cmd module is refused by the module proxy; v0.4.4 builds with Go 1.26.
version=v0.4.4
validator="$repo/.lab/bin/validate-krew-manifest"
# The validator installs through `kubectl krew install --manifest`: krew itself, as the
# kubectl plugin kubectl-krew, from the same module version.
krew="$repo/.lab/bin/krew-$version/kubectl-krew"

command -v go >/dev/null || { echo "validate.sh: go is not installed" >&2; exit 1; }
if [[ ! -x "$validator" || ! -x "$krew" || "$(cat "$validator.version" 2>/dev/null)" != "$version" ]]; then
	echo "validate.sh: building validate-krew-manifest and krew $version" >&2
	mkdir -p "$(dirname "$krew")"
	tmp=$(mktemp -d)
	(cd "$tmp" && GOBIN="$tmp" GOFLAGS=-buildvcs=false go install \
		"sigs.k8s.io/krew/cmd/validate-krew-manifest@$version" "sigs.k8s.io/krew/cmd/krew@$version")
	mv "$tmp/validate-krew-manifest" "$validator"
	mv "$tmp/krew" "$krew"
	rm -rf "$tmp"
	echo "$version" >"$validator.version"
fi

"$validator" -manifest "$manifest" -skip-install

bindir=${1:-}
[[ -n "$bindir" ]] || exit 0
work=$(mktemp -d)
server=
cleanup() {
	[[ -n "$server" ]] && kill "$server" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/pkg" "$work/www" "$work/manifest"
cp "$bindir/kubectl-guestcred" "$bindir/kubectl_complete-guestcred" "$work/pkg/"
printf 'Apache-2.0 (see the guestcred repository)\n' >"$work/pkg/LICENSE"
tar -C "$work/pkg" -czf "$work/www/kubectl-guestcred_linux_amd64.tar.gz" .
sum=$(sha256sum "$work/www/kubectl-guestcred_linux_amd64.tar.gz" | cut -d' ' -f1)
# A loopback HTTP server on a free port, which it writes to a file.
python3 - "$work/www" "$work/port" <<'PY' &
import functools, http.server, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
handler = functools.partial(Quiet, directory=sys.argv[1])
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
open(sys.argv[2] + ".tmp", "w").write(str(srv.server_address[1]))
import os; os.rename(sys.argv[2] + ".tmp", sys.argv[2])
srv.serve_forever()
PY
server=$!
for _ in $(seq 100); do [[ -s "$work/port" ]] && break; sleep 0.05; done
port=$(cat "$work/port")
# The committed manifest, with only the linux/amd64 platform, pointing at the local archive.
python3 - "$manifest" "$work/manifest/guestcred.yaml" "http://127.0.0.1:$port/kubectl-guestcred_linux_amd64.tar.gz" "$sum" <<'PY'
import sys, re
text = open(sys.argv[1]).read()
head, plats = text.split("  platforms:\n", 1)
first = plats.split("  - selector:")[1]
first = first.replace("RELEASE_BASE_URL/kubectl-guestcred_linux_amd64.tar.gz", sys.argv[3])
first = re.sub(r'sha256: "0+"', 'sha256: "%s"' % sys.argv[4], first)
assert "os: linux" in first and "arch: amd64" in first
open(sys.argv[2], "w").write(head + "  platforms:\n  - selector:" + first)
PY
HOME="$work" KREW_ROOT="$work/krew-root" PATH="$(dirname "$krew"):$PATH" "$validator" -manifest "$work/manifest/guestcred.yaml"
echo "validate.sh: manifest valid; linux/amd64 archive installed by krew's validator"
