#!/usr/bin/env bash
# `make demo`: two "hosts" (network namespaces) on one underlay network run flanneld against a
# local etcd, and traffic crosses the overlay between them. Everything the demo creates
# (namespaces, processes, temporary files) is removed at the end, also on Ctrl-C or failure.
#
#   BACKEND=udp|vxlan|host-gw   data path to show (default udp)
#   PYTHON=path                 interpreter with flannel's dependencies (default .venv/bin/python)
set -euo pipefail

BACKEND=${BACKEND:-udp}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
case "$PYTHON" in /*) ;; *) PYTHON="$PWD/$PYTHON" ;; esac

# flanneld also reads FLANNELD_* variables: the demo's hosts take only what it passes them
for var in $(compgen -e | grep '^FLANNELD_' || true); do unset "$var"; done

NS_PREFIX=fdemo
UNDERLAY=$NS_PREFIX-u
HOSTS=(h1 h2)
ETCD_IP=192.168.77.254
ETCD=http://$ETCD_IP:2379
NETWORK=10.10.0.0/16

if [ -t 1 ]; then B=$'\033[1m' N=$'\033[0m'; else B= N=; fi
bold() { printf '\n%s== %s%s\n' "$B" "$*" "$N"; }
say() { printf '   %s\n' "$*"; }
die() { printf '\ndemo failed: %s\n' "$*" >&2; exit 1; }
indent() { sed 's/^/     /'; }

case "$BACKEND" in udp|vxlan|host-gw) ;; *) die "BACKEND must be udp, vxlan or host-gw (got '$BACKEND')" ;; esac
[ "$(id -u)" -eq 0 ] || die "run as root: the demo creates network namespaces"
for tool in ip bridge ping iperf3 /usr/bin/etcd; do
    command -v "$tool" >/dev/null || die "missing $tool (make deps installs it)"
done
[ -x "$PYTHON" ] || die "no interpreter at $PYTHON (run 'make demo', which creates .venv)"
if ip netns list | grep -q "^$NS_PREFIX-"; then
    die "namespaces from an earlier demo are still there ($(ip netns list | grep -o "^$NS_PREFIX-[^ ]*" | tr '\n' ' ')); remove them with 'ip netns del NAME'"
fi

WORK=$(mktemp -d /tmp/flannel-demo.XXXXXX)
PIDS=()          # every process we start, ended by PID in cleanup
NAMESPACES=()    # every namespace we create

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    bold "Cleaning up"
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    local ns
    for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    if [ "$status" -ne 0 ]; then
        for log in "$WORK"/*/flanneld.log; do
            [ -f "$log" ] && { echo "--- last lines of $log"; tail -n 15 "$log"; }
        done
    fi
    rm -rf "$WORK"
    say "removed namespaces ${NAMESPACES[*]:-(none)}, stopped ${#PIDS[@]} processes, deleted $WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# etcd v2 request from inside the underlay namespace: etcd_v2 METHOD KEY [form data]
etcd_v2() {
    in_ns "$UNDERLAY" "$PYTHON" -I - "$@" <<'PY'
import json, sys, urllib.parse, urllib.request
method, key = sys.argv[1], sys.argv[2]
data = sys.argv[3].encode() if len(sys.argv) > 3 else None
req = urllib.request.Request("http://192.168.77.254:2379/v2/keys" + key, data=data, method=method)
if data:
    req.add_header("Content-Type", "application/x-www-form-urlencoded")
print(urllib.request.urlopen(req, timeout=5).read().decode())
PY
}

# ---------------------------------------------------------------------------
bold "Building two hosts on one underlay network (backend: $BACKEND)"
ip netns add "$UNDERLAY"; NAMESPACES+=("$UNDERLAY")
ip -n "$UNDERLAY" link set lo up
ip -n "$UNDERLAY" link add br0 type bridge
ip -n "$UNDERLAY" addr add $ETCD_IP/24 dev br0
ip -n "$UNDERLAY" link set br0 up
say "namespace $UNDERLAY: bridge br0 $ETCD_IP/24 (the 'switch', and where etcd runs)"
i=0
for h in "${HOSTS[@]}"; do
    i=$((i + 1))
    ns=$NS_PREFIX-$h
    ip netns add "$ns"; NAMESPACES+=("$ns")
    ip -n "$ns" link set lo up
    ip -n "$ns" link add eth0 type veth peer name "v$h" netns "$UNDERLAY"
    ip -n "$UNDERLAY" link set "v$h" master br0 up
    ip -n "$ns" addr add 192.168.77.$i/24 dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via $ETCD_IP
    mkdir -p "$WORK/$h"
    say "namespace $ns: eth0 192.168.77.$i/24, default route via $ETCD_IP"
done

bold "Starting etcd at $ETCD and writing the network config"
ip netns exec "$UNDERLAY" /usr/bin/etcd --name demo --data-dir "$WORK/etcd" \
    --listen-client-urls $ETCD --advertise-client-urls $ETCD \
    --listen-peer-urls http://$ETCD_IP:2380 --initial-advertise-peer-urls http://$ETCD_IP:2380 \
    --initial-cluster demo=http://$ETCD_IP:2380 --enable-v2=true >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
    etcd_v2 GET / >/dev/null 2>&1 && break
    sleep 0.2
done
etcd_v2 GET / >/dev/null 2>&1 || { tail -n 20 "$WORK/etcd.log"; die "etcd did not start"; }
CONFIG="{\"Network\":\"$NETWORK\",\"Backend\":{\"Type\":\"$BACKEND\"}}"
etcd_v2 PUT /coreos.com/network/config "value=$CONFIG" >/dev/null
say "/coreos.com/network/config = $CONFIG"

bold "Starting flanneld on each host"
declare -A FLANNELD
for h in "${HOSTS[@]}"; do
    : >"$WORK/$h/options.env"   # so that a machine-wide /etc/flannel/options.env stays out
    ip netns exec "$NS_PREFIX-$h" env PYTHONPATH="$REPO" "$PYTHON" -m flannel \
        --config-file="$WORK/$h/options.env" --etcd-endpoints=$ETCD --subnet-file="$WORK/$h/subnet.env" \
        --subnet-dir="$WORK/$h/networks" >"$WORK/$h/flanneld.log" 2>&1 &
    PIDS+=($!); FLANNELD[$h]=$!
    say "$h: python -m flannel --etcd-endpoints=$ETCD --subnet-file=$WORK/$h/subnet.env  (pid $!)"
done
for h in "${HOSTS[@]}"; do
    for _ in $(seq 150); do
        [ -s "$WORK/$h/subnet.env" ] && break
        kill -0 "${FLANNELD[$h]}" 2>/dev/null || die "$h: flanneld exited (its log follows)"
        sleep 0.2
    done
    [ -s "$WORK/$h/subnet.env" ] || die "$h: flanneld wrote no subnet file within 30 s"
done

declare -A ADDR
for h in "${HOSTS[@]}"; do
    bold "$h: what flanneld did"
    say "subnet.env (read by docker/CNI to configure containers):"
    indent <"$WORK/$h/subnet.env"
    subnet=$(sed -n 's/^FLANNEL_SUBNET=//p' "$WORK/$h/subnet.env")
    ADDR[$h]=${subnet%/*}
    case "$BACKEND" in
        udp)   say "TUN device flannel0 (packets go to flanneld, which sends them over UDP 8285):"
               in_ns "$NS_PREFIX-$h" ip -br addr show dev flannel0 | indent ;;
        vxlan) say "VXLAN device flannel.1 (the kernel encapsulates, UDP 8472):"
               in_ns "$NS_PREFIX-$h" ip -br addr show dev flannel.1 | indent
               say "forwarding database (peer VTEP MAC -> peer host):"
               in_ns "$NS_PREFIX-$h" bridge fdb show dev flannel.1 | indent ;;
        host-gw) say "no device: peers' subnets are routed via the peers' own addresses" ;;
    esac
    say "routes:"
    in_ns "$NS_PREFIX-$h" ip -4 route show | indent
    # flanneld never puts FLANNEL_SUBNET on an interface: docker or a CNI bridge does. Do that here.
    ip -n "$NS_PREFIX-$h" link add cni0 type bridge
    ip -n "$NS_PREFIX-$h" addr add "$subnet" dev cni0
    ip -n "$NS_PREFIX-$h" link set cni0 up
    say "added bridge cni0 with $subnet, as a container runtime would"
done

bold "Leases in etcd"
etcd_v2 GET "/coreos.com/network/subnets?recursive=true" | "$PYTHON" -c '
import json, sys
for node in json.load(sys.stdin)["node"].get("nodes", []):
    print("     %s = %s  (ttl %ss)" % (node["key"], node["value"], node.get("ttl", "-")))'

bold "Ping across the overlay"
for pair in "h1 h2" "h2 h1"; do
    set -- $pair
    say "$1 (${ADDR[$1]}) -> $2 (${ADDR[$2]}):"
    ok=
    for _ in $(seq 20); do
        if out=$(in_ns "$NS_PREFIX-$1" ping -n -c 3 -i 0.3 -W 2 -I "${ADDR[$1]}" "${ADDR[$2]}" 2>&1); then ok=1; break; fi
        sleep 0.5
    done
    printf '%s\n' "$out" | grep -E 'bytes from|packet loss' | indent
    [ -n "$ok" ] || die "no answer from ${ADDR[$2]}"
done
if [ "$BACKEND" = udp ]; then say "(ttl=62: each host's flanneld decrements the TTL on the way, as a router would)"; fi

bold "iperf3: TCP from h1 to h2 for 3 seconds"
ip netns exec "$NS_PREFIX-h2" iperf3 -s -1 -B "${ADDR[h2]}" >"$WORK/iperf3-server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do in_ns "$NS_PREFIX-h2" ss -Hltn "sport = :5201" | grep -q 5201 && break; sleep 0.1; done
in_ns "$NS_PREFIX-h1" iperf3 -c "${ADDR[h2]}" -B "${ADDR[h1]}" -t 3 -f m | grep -E 'sender|receiver' | indent

bold "Done: two hosts exchanged traffic over the $BACKEND overlay."
say "Other backends: make demo BACKEND=udp | BACKEND=vxlan | BACKEND=host-gw"
