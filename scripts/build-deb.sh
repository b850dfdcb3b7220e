#!/usr/bin/env bash
# Build the flanneld .deb into dist/ (or $DIST_DIR) from this checkout (make deb). Needs the Build-Depends of
# packaging/deb/debian/control (scripts/install-deps.sh --packaging installs them).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=SCRIPTDIR/packaging-lib.sh
. "$root/scripts/packaging-lib.sh"
# Debian's build tools must run the system python3, not one found first on PATH (pyenv, venv).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

version=$(project_version "$root")
deb_version=$(dpkg-parsechangelog -l "$root/packaging/deb/debian/changelog" -S Version)
require_version packaging/deb/debian/changelog "$deb_version" "$version" \
    "add a changelog entry (dch -v $version)"

work=$(mktemp -d /tmp/flanneld-deb.XXXXXX)
trap 'rm -rf -- "$work"' EXIT
src="$work/flannel-py-$version"
copy_source_tree "$root" "$src"
cp -a "$root/packaging/deb/debian" "$src/debian"

# noddebs: no separate debug-symbol package in dist/.
(cd "$src" && DEB_BUILD_OPTIONS="noddebs ${DEB_BUILD_OPTIONS:-}" dpkg-buildpackage -b -us -uc) \
    >"$work/build.log" 2>&1 || { tail -n 60 "$work/build.log" >&2; echo "dpkg-buildpackage failed" >&2; exit 1; }

dist=${DIST_DIR:-$root/dist}
mkdir -p "$dist"
rm -f "$dist"/flanneld_*.deb
cp "$work"/flanneld_"$version"_*.deb "$dist/"
ls "$dist"/flanneld_"$version"_*.deb
