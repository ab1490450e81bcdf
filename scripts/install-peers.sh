#!/usr/bin/env bash
# Installs the real DICOM peers the end-to-end tests talk to (Debian packages):
# dcmtk (storescu, echoscu, dsrdump), orthanc (the PACS), dicom3tools (dciodvfy),
# and postgresql for the scale-out tests.
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || need+=(orthanc)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # The packaged services are not wanted: tests start their own instances on free ports.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # The downloaded .debs are not needed once installed; the venv needs the room.
    $SUDO apt-get clean
fi
echo "peers: ok ($(storescu --version 2>/dev/null | head -1 | tr -d '\n'))"
