#!/bin/bash
# Turn flanneld's subnet.env into options for the docker daemon, in the format Go flannel's
# mk-docker-opts.sh writes, so existing docker.service drop-ins keep working:
#   DOCKER_OPT_BIP="--bip=10.1.23.1/24"        (-i: one variable per option)
#   DOCKER_OPTS=" --bip=10.1.23.1/24 ..."      (-c: one combined variable, name set with -k)
# The subnet file is parsed, not sourced, so a stray line in it cannot run as shell code.
set -euo pipefail

usage() {
    cat >&2 <<USAGE
usage: $0 [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]

Generate docker daemon options from flanneld's subnet file.
  -f FILE  flannel subnet file to read (default /run/flannel/subnet.env)
  -d FILE  docker environment file to write (default /run/docker_opts.env)
  -i       write each option as its own variable, e.g. DOCKER_OPT_MTU="--mtu=1472"
  -c       write all options combined into one variable (DOCKER_OPTS unless -k)
  -k KEY   name of the combined variable (default DOCKER_OPTS); its value in the
           environment, if any, is kept in front of the generated options
  -m       do not write --ip-masq (for docker versions without that option)
With neither -i nor -c, both are written.
USAGE
    exit 1
}

die() {
    echo "$0: $*" >&2
    exit 1
}

flannel_env=/run/flannel/subnet.env
docker_env=/run/docker_opts.env
combined_key=DOCKER_OPTS
individual=false
combined=false
ipmasq=true

while getopts ":f:d:icmk:h" opt; do
    case $opt in
        f) flannel_env=$OPTARG ;;
        d) docker_env=$OPTARG ;;
        i) individual=true ;;
        c) combined=true ;;
        m) ipmasq=false ;;
        k) combined_key=$OPTARG ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || usage
if [ "$individual" = false ] && [ "$combined" = false ]; then
    individual=true
    combined=true
fi
[[ $combined_key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "-k $combined_key is not a valid variable name"
[ -r "$flannel_env" ] || die "cannot read flannel subnet file $flannel_env"

FLANNEL_SUBNET=""
FLANNEL_MTU=""
FLANNEL_IPMASQ=""
while IFS= read -r line || [ -n "$line" ]; do
    line=${line%$'\r'}
    case $line in
        FLANNEL_SUBNET=*) FLANNEL_SUBNET=${line#*=} ;;
        FLANNEL_MTU=*) FLANNEL_MTU=${line#*=} ;;
        FLANNEL_IPMASQ=*) FLANNEL_IPMASQ=${line#*=} ;;
    esac
done <"$flannel_env"

# Option names in the order Go's script emits them (alphabetical by variable name).
names=()
values=()
if [ -n "$FLANNEL_SUBNET" ]; then
    names+=(DOCKER_OPT_BIP)
    values+=("--bip=$FLANNEL_SUBNET")
fi
if [ -n "$FLANNEL_IPMASQ" ] && [ "$ipmasq" = true ]; then
    # When flanneld masquerades traffic leaving the overlay, docker must not do it again.
    case $FLANNEL_IPMASQ in
        true) masq=false ;;
        false) masq=true ;;
        *) die "invalid FLANNEL_IPMASQ=$FLANNEL_IPMASQ in $flannel_env (expected true or false)" ;;
    esac
    names+=(DOCKER_OPT_IPMASQ)
    values+=("--ip-masq=$masq")
fi
if [ -n "$FLANNEL_MTU" ]; then
    names+=(DOCKER_OPT_MTU)
    values+=("--mtu=$FLANNEL_MTU")
fi

opts=${!combined_key:-}
[ -z "$opts" ] || opts="$opts "
out=""
for i in "${!names[@]}"; do
    if [ "$individual" = true ]; then
        out+="${names[$i]}=\"${values[$i]}\""$'\n'
    fi
    opts+=" ${values[$i]}"
done
if [ "$combined" = true ]; then
    out+="$combined_key=\"$opts\""$'\n'
fi

# Write next to the target and rename, so docker never reads a half-written file.
dir=$(dirname -- "$docker_env")
[ -d "$dir" ] || mkdir -p -- "$dir"
tmp=$(mktemp "$dir/.docker-opts.XXXXXX")
trap 'rm -f -- "$tmp"' EXIT
printf '%s' "$out" >"$tmp"
chmod 0644 "$tmp"
mv -f -- "$tmp" "$docker_env"
trap - EXIT
