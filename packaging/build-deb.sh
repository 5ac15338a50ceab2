#!/bin/sh
# Build the rarewrite .debs (rarewrite-common, rarewrite-agent,
# rarewrite-collector) with Debian's own tooling; leaves them in dist/.
#
#   packaging/build-deb.sh              build from a clean checkout of HEAD
#   packaging/build-deb.sh --worktree   build from the working tree as it is
#                                       (tracked and untracked, minus .gitignore'd)
#
# Missing build dependencies are installed with apt-get (as root, or via sudo).
# RAREWRITE_DIST=DIR puts the packages in DIR instead of dist/.
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
dist=${RAREWRITE_DIST:-$top/dist}
mode=head
case "${1:-}" in
    --worktree) mode=worktree ;;
    "") ;;
    *) echo "usage: $0 [--worktree]" >&2; exit 2 ;;
esac

builddeps="dpkg-dev debhelper dh-python python3-all"
missing=""
for p in $builddeps; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "build-deb: installing build dependencies:$missing"
    if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo=sudo; else
        echo "build-deb: need root (or sudo) to install:$missing" >&2; exit 1
    fi
    $sudo apt-get -o DPkg::Lock::Timeout=300 update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends $missing
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/rarewrite-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
src="$work/rarewrite"
mkdir "$src"

if git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
    if [ "$mode" = head ]; then
        git -C "$top" archive --format=tar HEAD | tar -x -C "$src"
        echo "build-deb: building $(git -C "$top" rev-parse --short HEAD) (clean checkout of HEAD)"
    else
        (cd "$top" && git ls-files -z --cached --others --exclude-standard \
            | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
            | tar --null -T - -cf -) | tar -x -C "$src"
        echo "build-deb: building the working tree"
    fi
else
    (cd "$top" && tar --exclude=.git --exclude=.venv --exclude=dist --exclude=build \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - .) | tar -x -C "$src"
fi

cp -r "$src/packaging/debian" "$src/debian"
(cd "$src" && dpkg-buildpackage -us -uc -b)

mkdir -p "$dist"
for f in "$work"/*.deb "$work"/*.buildinfo "$work"/*.changes; do
    [ -e "$f" ] && cp "$f" "$dist/"
done
echo "build-deb: done:"
ls -1 "$dist"/*.deb
