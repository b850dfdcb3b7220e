# Helpers shared by build-deb.sh and build-rpm.sh (sourced, not run).

# The version of the flannel package, read from flannel/__init__.py without importing it.
project_version() {
    sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$1/flannel/__init__.py"
}

# Fail unless the packaging file $1, at version $2, matches the project version $3; $4 says
# what to update.
require_version() {
    if [ "$2" != "$3" ]; then
        echo "$1 is at version $2 but flannel/__init__.py says $3: $4" >&2
        exit 1
    fi
}

# Copy the project's source files (what git tracks plus new files it does not ignore; without
# git, everything but build products) from $1 into the new directory $2.
copy_source_tree() {
    local from=$1 to=$2
    mkdir -p "$to"
    if git -C "$from" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # Files deleted but not yet committed are skipped.
        (cd "$from" && git ls-files -z --cached --others --exclude-standard \
            | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
            | tar --null -T - -cf -) | tar -xf - -C "$to"
    else
        tar -C "$from" --exclude=.git --exclude=.venv --exclude=dist --exclude=build \
            --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
            --exclude=.hypothesis --exclude='*.so' --exclude=flannel/_proxy.c -cf - . \
            | tar -xf - -C "$to"
    fi
}
