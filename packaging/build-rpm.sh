#!/bin/sh
# Build the rarewrite RPMs (rarewrite-common, -agent, -collector) with
# rpmbuild; leaves them in dist/ (or $RAREWRITE_DIST).
#
#   packaging/build-rpm.sh              from a clean checkout of HEAD
#   packaging/build-rpm.sh --worktree   from the working tree as it is
#
# On RHEL/Fedora (rpm-build and systemd-rpm-macros installed) this is a normal
# build. On Debian/Ubuntu, Debian's `rpm` package provides rpmbuild but no
# RPM database and no systemd-rpm-macros: the build then runs with --nodeps
# and a fallback copy of the systemd scriptlet macros (the same commands
# systemd-rpm-macros expands to). Build the release RPMs on an RPM distro.
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
dist=${RAREWRITE_DIST:-$top/dist}
mode=head
case "${1:-}" in
    --worktree) mode=worktree ;;
    "") ;;
    *) echo "usage: $0 [--worktree]" >&2; exit 2 ;;
esac

if ! command -v rpmbuild >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
        echo "build-rpm: installing Debian's rpm package (for rpmbuild)"
        apt-get -o DPkg::Lock::Timeout=300 update -q
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends rpm
    else
        echo "build-rpm: rpmbuild not found: install rpm-build (RHEL/Fedora) or rpm (Debian, as root)" >&2
        exit 1
    fi
fi

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$top/agent/__init__.py")
spec_version=$(sed -n 's/^Version: *//p' "$top/packaging/rpm/rarewrite.spec")
if [ "$version" != "$spec_version" ]; then
    echo "build-rpm: agent.__version__ is $version but the spec says $spec_version" >&2
    exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/rarewrite-rpm.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
mkdir -p "$work/SOURCES" "$work/src/rarewrite-$version"
src="$work/src/rarewrite-$version"
if git -C "$top" rev-parse --git-dir >/dev/null 2>&1 && [ "$mode" = head ]; then
    git -C "$top" archive --format=tar HEAD | tar -x -C "$src"
elif git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$top" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
        | tar --null -T - -cf -) | tar -x -C "$src"
else
    (cd "$top" && tar --exclude=.git --exclude=.venv --exclude=dist --exclude=build \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - .) | tar -x -C "$src"
fi
tar -C "$work/src" -czf "$work/SOURCES/rarewrite-$version.tar.gz" "rarewrite-$version"

set -- --define "_topdir $work" -bb "$top/packaging/rpm/rarewrite.spec"
if [ "$(rpm --eval '%{?systemd_post:yes}')" != yes ]; then
    echo "build-rpm: no systemd-rpm-macros here (not an RPM distro): --nodeps and fallback macros"
    cat > "$work/systemd.macros" <<'MACROS'
%systemd_requires Requires(post): systemd\
Requires(preun): systemd\
Requires(postun): systemd
%systemd_post() if [ $1 -eq 1 ] && [ -x /usr/bin/systemctl ]; then /usr/bin/systemctl --no-reload preset %{?*} >/dev/null 2>&1 || :; fi
%systemd_preun() if [ $1 -eq 0 ] && [ -x /usr/bin/systemctl ]; then /usr/bin/systemctl --no-reload disable --now %{?*} >/dev/null 2>&1 || :; fi
%systemd_postun_with_restart() if [ $1 -ge 1 ] && [ -x /usr/bin/systemctl ]; then /usr/bin/systemctl try-restart %{?*} >/dev/null 2>&1 || :; fi
MACROS
    set -- --nodeps --load "$work/systemd.macros" "$@"
fi
rpmbuild "$@"

mkdir -p "$dist"
find "$work/RPMS" -name '*.rpm' -exec cp {} "$dist/" \;
echo "build-rpm: done:"
ls -1 "$dist"/*.rpm
