#!/usr/bin/env bash
# Build the flanneld .rpm into dist/ (or $DIST_DIR) from this checkout (make rpm), with
# rpmbuild (on Debian the `rpm` package). BuildRequires are not checked (--nodeps): a Debian
# host has no RPM database; the build needs python3 with build, installer, setuptools, wheel
# and cffi.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=SCRIPTDIR/packaging-lib.sh
. "$root/scripts/packaging-lib.sh"
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
spec="$root/packaging/rpm/flanneld.spec"

version=$(project_version "$root")
spec_version=$(sed -n 's/^Version:[[:space:]]*//p' "$spec")
require_version packaging/rpm/flanneld.spec "$spec_version" "$version" \
    "update Version, Release and %changelog"

work=$(mktemp -d /tmp/flanneld-rpm.XXXXXX)
trap 'rm -rf -- "$work"' EXIT
mkdir -p "$work"/{BUILD,RPMS,SOURCES,SPECS,SRPMS}
copy_source_tree "$root" "$work/flannel-py-$version"
tar -C "$work" -czf "$work/SOURCES/flannel-py-$version.tar.gz" "flannel-py-$version"

rpmbuild -bb --nodeps --define "_topdir $work" "$spec" >"$work/build.log" 2>&1 \
    || { tail -n 60 "$work/build.log" >&2; echo "rpmbuild failed" >&2; exit 1; }

dist=${DIST_DIR:-$root/dist}
mkdir -p "$dist"
rm -f "$dist"/flanneld-[0-9]*.rpm
find "$work/RPMS" -name "flanneld-$version-*.rpm" -exec cp {} "$dist/" \;
ls "$dist"/flanneld-"$version"-*.rpm
