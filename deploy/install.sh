#!/usr/bin/env bash
# Install (or uninstall) cytoedge as a systemd service. Safe to run again: an upgrade is a re-run.
# See docs/deploy.md. Run `deploy/install.sh --help` for the options.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: deploy/install.sh [options]

Installs cytoedge into a virtual environment, installs the systemd unit and a default
configuration, and starts the service.

  --prefix DIR    install location of the venv (default /opt/cytoedge -> /opt/cytoedge/venv)
  --destdir DIR   staged install for packaging: every path is written under DIR; no user is
                  created, no ownership is changed, systemctl is not run
  --source DIR    the cytoedge source tree to install (default: the tree this script is in)
  --python PY     interpreter for the venv (default python3; needs >= 3.10)
  --no-start      install, but do not enable or start the service
  --skip-venv     do not create the venv or pip install (also CYTOEDGE_SKIP_VENV=1); for tests,
                  or when only the unit/config need refreshing
  --uninstall     stop and disable the service, remove the unit and the venv; keeps
                  /etc/cytoedge, /var/lib/cytoedge and the cytoedge user
  -h, --help      this text

Never overwrites an existing /etc/cytoedge/cytoedge.toml.
EOF
}

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "$*"; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX=/opt/cytoedge
DESTDIR=${DESTDIR:-}
SOURCE=$(cd "$SCRIPT_DIR/.." && pwd)
PYTHON=python3
START=1
SKIP_VENV=${CYTOEDGE_SKIP_VENV:-0}
UNINSTALL=0

need_arg() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --prefix) need_arg "$@"; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --destdir) need_arg "$@"; DESTDIR=$2; shift 2 ;;
        --destdir=*) DESTDIR=${1#*=}; shift ;;
        --source) need_arg "$@"; SOURCE=$2; shift 2 ;;
        --source=*) SOURCE=${1#*=}; shift ;;
        --python) need_arg "$@"; PYTHON=$2; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --no-start) START=0; shift ;;
        --skip-venv) SKIP_VENV=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

[[ $PREFIX == /* ]] || die "--prefix must be an absolute path: $PREFIX"
# The prefix ends up in ExecStart= and in sed expressions: keep it to plain path characters.
[[ $PREFIX =~ ^[A-Za-z0-9._/+-]+$ ]] || die "--prefix may only contain letters, digits and ._/+-"
PREFIX=${PREFIX%/}
[[ -n $PREFIX ]] || die "--prefix / is not allowed"
if [[ -n $DESTDIR ]]; then
    mkdir -p "$DESTDIR"
    DESTDIR=$(cd "$DESTDIR" && pwd)
    [[ $DESTDIR =~ ^[A-Za-z0-9._/+-]+$ ]] || die "--destdir may only contain letters, digits and ._/+-"
    [[ $DESTDIR != / ]] || DESTDIR=
fi
[[ $SKIP_VENV == 1 || $SKIP_VENV == 0 ]] || SKIP_VENV=1

SERVICE=cytoedge
SVC_USER=cytoedge
UNIT_PATH=/etc/systemd/system/$SERVICE.service
CONF_DIR=/etc/cytoedge
CONF_PATH=$CONF_DIR/cytoedge.toml
STATE_DIR=/var/lib/cytoedge
VENV=$PREFIX/venv

# Real (staged) locations.
D_UNIT=$DESTDIR$UNIT_PATH
D_CONF_DIR=$DESTDIR$CONF_DIR
D_CONF=$DESTDIR$CONF_PATH
D_STATE=$DESTDIR$STATE_DIR
D_PREFIX=$DESTDIR$PREFIX
D_VENV=$DESTDIR$VENV

staged() { [[ -n $DESTDIR ]]; }
systemd_running() { ! staged && [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; }

if ! staged && [[ $EUID -ne 0 ]]; then
    die "run as root (or use --destdir DIR for a staged install)"
fi

# ----------------------------------------------------------------------------------------------
uninstall() {
    if [[ -e $D_UNIT ]] && systemd_running; then
        systemctl disable --now "$SERVICE.service" >/dev/null 2>&1 || true
        say "stopped and disabled $SERVICE.service"
    fi
    if [[ -e $D_UNIT ]]; then
        rm -f "$D_UNIT"
        say "removed $D_UNIT"
    else
        say "not installed: $D_UNIT"
    fi
    if systemd_running; then
        systemctl daemon-reload
        systemctl reset-failed "$SERVICE.service" >/dev/null 2>&1 || true
        say "ran systemctl daemon-reload"
    fi
    if [[ -d $D_UNIT.d ]]; then
        say "kept $D_UNIT.d (local drop-ins; remove by hand if no longer wanted)"
    fi
    if [[ -f $D_VENV/pyvenv.cfg ]]; then
        rm -rf "$D_VENV"
        say "removed $D_VENV"
    elif [[ -e $D_VENV ]]; then
        say "left $D_VENV in place: it does not look like a venv (no pyvenv.cfg)"
    else
        say "not installed: $D_VENV"
    fi
    if [[ -f $D_PREFIX/docs/deploy.md ]]; then
        rm -f "$D_PREFIX/docs/deploy.md"
        rmdir "$D_PREFIX/docs" 2>/dev/null || true
    fi
    if [[ -d $D_PREFIX ]] && rmdir "$D_PREFIX" 2>/dev/null; then
        say "removed $D_PREFIX"
    fi
    if [[ -e $D_CONF_DIR ]]; then say "kept $D_CONF_DIR (configuration)"; fi
    if [[ -e $D_STATE ]]; then say "kept $D_STATE (engine cache and state)"; fi
    if ! staged && id -u "$SVC_USER" >/dev/null 2>&1; then
        say "kept user $SVC_USER (userdel $SVC_USER to remove it)"
    fi
}

# ----------------------------------------------------------------------------------------------
ensure_user() {
    if staged; then
        say "skipped user creation (staged install)"
        return
    fi
    if getent group "$SVC_USER" >/dev/null; then
        say "kept existing group $SVC_USER"
    else
        groupadd --system "$SVC_USER"
        say "created group $SVC_USER"
    fi
    if id -u "$SVC_USER" >/dev/null 2>&1; then
        say "kept existing user $SVC_USER"
    else
        local nologin=/usr/sbin/nologin
        [[ -x $nologin ]] || nologin=/bin/false
        useradd --system --gid "$SVC_USER" --home-dir "$STATE_DIR" --no-create-home \
            --shell "$nologin" --comment "cytoedge service" "$SVC_USER"
        say "created user $SVC_USER"
    fi
    local g
    for g in video render; do
        if getent group "$g" >/dev/null; then
            if id -nG "$SVC_USER" | tr ' ' '\n' | grep -qx "$g"; then
                say "kept $SVC_USER in group $g"
            else
                usermod -a -G "$g" "$SVC_USER"
                say "added $SVC_USER to group $g"
            fi
        else
            say "no group $g on this system: skipped"
        fi
    done
}

ensure_venv() {
    if [[ $SKIP_VENV == 1 ]]; then
        say "skipped venv and pip install (--skip-venv)"
        return
    fi
    [[ -f $SOURCE/pyproject.toml ]] || die "no pyproject.toml in --source $SOURCE"
    command -v "$PYTHON" >/dev/null || die "python not found: $PYTHON"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$PYTHON is older than Python 3.10"
    if [[ -x $D_VENV/bin/python ]]; then
        say "kept existing venv $D_VENV"
    else
        mkdir -p "$D_PREFIX"
        # System site-packages: JetPack's TensorRT and pycuda come from apt, not from PyPI.
        "$PYTHON" -m venv --system-site-packages "$D_VENV"
        say "created venv $D_VENV (with system site-packages)"
    fi
    # A local directory is always rebuilt and reinstalled, so a re-run upgrades the code.
    "$D_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir "$SOURCE"
    say "installed cytoedge from $SOURCE into $D_VENV"
    if staged; then
        # Scripts and activate files name the venv by its staged path; point them at the final one.
        local f
        while IFS= read -r -d '' f; do
            if grep -qI -F "$D_VENV" "$f"; then
                sed -i "s#$D_VENV#$VENV#g" "$f"
            fi
        done < <(find "$D_VENV/bin" -maxdepth 1 -type f -print0)
        say "rewrote $D_VENV/bin scripts for the final path $VENV"
    fi
}

render_unit() {
    # ExecStart (and the docs path) name /opt/cytoedge; rewrite to the prefix.
    local src=$SOURCE/deploy/cytoedge.service
    [[ -f $src ]] || src=$SCRIPT_DIR/cytoedge.service
    [[ -f $src ]] || die "cannot find deploy/cytoedge.service"
    local groups=""
    if ! staged; then
        local g
        for g in video render; do
            getent group "$g" >/dev/null && groups+="${groups:+ }$g"
        done
    fi
    sed -e "s#/opt/cytoedge/#$PREFIX/#g" "$src" | {
        if staged; then
            cat
        elif [[ -n $groups ]]; then
            sed -e "s#^SupplementaryGroups=.*#SupplementaryGroups=$groups#"
        else
            # A group that does not exist makes the service fail to start (status=216/GROUP).
            sed -e "/^SupplementaryGroups=/d"
        fi
    }
}

install_file_if_changed() {  # SRC_CONTENT_FILE DEST MODE
    local tmp=$1 dest=$2 mode=$3
    if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then
        chmod "$mode" "$dest"
        say "unchanged $dest"
    elif [[ -f $dest ]]; then
        install -m "$mode" "$tmp" "$dest"
        say "updated $dest"
    else
        install -m "$mode" "$tmp" "$dest"
        say "installed $dest"
    fi
}

install_unit() {
    mkdir -p "$(dirname "$D_UNIT")"
    local tmp
    tmp=$(mktemp)
    render_unit >"$tmp"
    install_file_if_changed "$tmp" "$D_UNIT" 0644
    rm -f "$tmp"
    local doc=$SOURCE/docs/deploy.md
    if [[ -f $doc ]]; then
        mkdir -p "$D_PREFIX/docs"
        install -m 0644 "$doc" "$D_PREFIX/docs/deploy.md"
        say "installed $D_PREFIX/docs/deploy.md"
    fi
}

install_config() {
    local src=$SOURCE/deploy/cytoedge.toml
    [[ -f $src ]] || src=$SCRIPT_DIR/cytoedge.toml
    [[ -f $src ]] || die "cannot find deploy/cytoedge.toml"
    if [[ -d $D_CONF_DIR ]]; then
        say "kept existing $D_CONF_DIR"
    else
        # Same as systemd's ConfigurationDirectory= default; the file itself is 0640 root:cytoedge.
        install -d -m 0755 "$D_CONF_DIR"
        say "created $D_CONF_DIR"
    fi
    if [[ -e $D_CONF ]]; then
        say "kept existing $D_CONF (not overwritten)"
    else
        install -m 0640 "$src" "$D_CONF"
        staged || chown "root:$SVC_USER" "$D_CONF"
        say "installed $D_CONF"
    fi
}

install_state_dir() {
    if [[ -d $D_STATE ]]; then
        say "kept existing $D_STATE"
    else
        install -d -m 0750 "$D_STATE"
        say "created $D_STATE"
    fi
    chmod 0750 "$D_STATE"
    staged || chown "$SVC_USER:$SVC_USER" "$D_STATE"
}

start_service() {
    if staged; then
        say "skipped systemctl (staged install)"
        return
    fi
    if ! systemd_running; then
        say "systemd is not running here: skipped daemon-reload and enable"
        return
    fi
    systemctl daemon-reload
    say "ran systemctl daemon-reload"
    if [[ $START == 0 ]]; then
        say "not started (--no-start): systemctl enable --now $SERVICE"
        return
    fi
    systemctl enable "$SERVICE.service" >/dev/null 2>&1
    say "enabled $SERVICE.service"
    # restart, not start: a re-run after an upgrade must load the new code. --no-block because
    # the first start builds the TensorRT engine and may take minutes before READY=1.
    systemctl restart --no-block "$SERVICE.service"
    say "started $SERVICE.service (follow it: journalctl -u $SERVICE -f; systemctl status $SERVICE)"
}

# ----------------------------------------------------------------------------------------------
if [[ $UNINSTALL == 1 ]]; then
    uninstall
    exit 0
fi

[[ -d $SOURCE ]] || die "--source is not a directory: $SOURCE"
SOURCE=$(cd "$SOURCE" && pwd)

ensure_user
ensure_venv
install_unit
install_config
install_state_dir
start_service
say "done"
