#!/usr/bin/env bash
# Make sure PostgreSQL (server) and PostGIS are installed; the embedded STAC API needs both.
# Installs them with apt-get when missing (as root, or through sudo). Idempotent and quiet when
# everything is already there.
set -euo pipefail

have_postgis() {
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/postgres" ] || continue
    v=$(basename "$(dirname "$d")")
    [ -f "/usr/share/postgresql/$v/extension/postgis.control" ] && return 0
  done
  # conda / other prefixes: pg_config on PATH that knows a postgis extension
  if command -v pg_config >/dev/null 2>&1; then
    [ -f "$(pg_config --sharedir)/extension/postgis.control" ] && command -v postgres >/dev/null && return 0
  fi
  return 1
}

if have_postgis; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "PostgreSQL with PostGIS is needed and apt-get is not available here." >&2
  echo "Install PostgreSQL 15+ and PostGIS 3 (e.g. 'conda env create -f environment.yml'), then re-run." >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "PostgreSQL + PostGIS are missing and installing them needs root." >&2
    echo "Run: sudo apt-get install -y postgresql postgresql-15-postgis-3   (then re-run make)" >&2
    exit 1
  fi
fi

echo "Installing PostgreSQL + PostGIS with apt-get (one time)..."
export DEBIAN_FRONTEND=noninteractive
pkg=postgresql-15-postgis-3
if ! $SUDO apt-get install -y -q --no-install-recommends "$pkg" postgresql-contrib >/tmp/ssl4eo-apt.log 2>&1; then
  $SUDO apt-get update -q >/tmp/ssl4eo-apt.log 2>&1 || true
  # newest PostGIS package the archive has, whatever the PostgreSQL major version
  cand=$(apt-cache pkgnames postgresql- 2>/dev/null | grep -E '^postgresql-[0-9]+-postgis-3$' | sort -V | tail -1 || true)
  pkg=${cand:-$pkg}
  if ! $SUDO apt-get install -y -q --no-install-recommends "$pkg" postgresql-contrib >>/tmp/ssl4eo-apt.log 2>&1; then
    echo "Could not install $pkg with apt-get (log: /tmp/ssl4eo-apt.log)." >&2
    echo "Install PostgreSQL + PostGIS yourself (Debian: apt-get install postgresql-15-postgis-3) and re-run." >&2
    exit 1
  fi
fi
have_postgis || { echo "PostGIS still not found after installing $pkg; see /tmp/ssl4eo-apt.log" >&2; exit 1; }
echo "PostgreSQL + PostGIS installed."
