/* proxy.h: the API of the udp backend's packet loop (csrc/proxy.c).
 *
 * This file is read both by the C compiler and by cffi's cdef (build_ext.py), so it holds
 * declarations only: no #include, no #if, no macros. Include <stdint.h> before it.
 *
 * Addresses and ports are passed in host byte order (Python's int(IPv4Address)).
 * Functions returning int return 0 (or a count) on success and -errno on failure.
 */

typedef struct proxy proxy_t;

/* Monotonic counters, readable from any thread at any time (each field is read atomically). */
struct proxy_counters {
    uint64_t tun_rx_packets;    /* packets read from the TUN */
    uint64_t tun_rx_bytes;
    uint64_t udp_tx_packets;    /* datagrams sent to peers */
    uint64_t udp_tx_bytes;
    uint64_t udp_tx_gso;        /* of those, datagrams that left in UDP GSO runs (batch > 1) */
    uint64_t udp_rx_packets;    /* datagrams received from peers */
    uint64_t udp_rx_bytes;
    uint64_t udp_rx_gro;        /* of those, datagrams that arrived joined by UDP GRO (batch > 1) */
    uint64_t tun_tx_packets;    /* packets written to the TUN (ICMP errors not included) */
    uint64_t tun_tx_bytes;
    uint64_t drop_runt;         /* shorter than an IPv4 header */
    uint64_t drop_oversize;     /* longer than the MTU (or truncated on receive) */
    uint64_t drop_bad_header;   /* not IPv4, bad IHL or total length */
    uint64_t drop_no_route;     /* destination in no peer subnet */
    uint64_t drop_ttl;          /* TTL would reach 0 */
    uint64_t drop_send_error;   /* sendmmsg/write failed for the packet */
    uint64_t icmp_sent;         /* ICMP net-unreachable written back into the TUN */
    uint64_t read_errors;       /* unexpected read/recv errors (the loop goes on) */
    uint64_t polls;             /* poll() rounds */
    uint64_t syscalls;          /* packet I/O system calls (read, write, send*, recv*) */
    uint64_t routes;            /* routes in the table now */
};

/* A proxy over an open TUN fd (IFF_TUN|IFF_NO_PI, put into non-blocking mode here) and a bound
 * UDP socket. Both fds stay owned by the caller (with batch > 1, UDP_GRO is turned on for the
 * socket). tun_addr is the source of the ICMP errors we
 * generate; mtu bounds the packet size in both directions; batch (1..128) is the number of
 * packets moved per system call where the kernel allows it (1: one packet per call, as Go's
 * flanneld). Returns NULL with errno set on failure. */
proxy_t *proxy_new(int tun_fd, int udp_fd, uint32_t tun_addr, int mtu, int batch);

/* Free a proxy whose proxy_run has returned (or never ran). Does not close the fds. */
void proxy_free(proxy_t *p);

/* Loop over the TUN, the UDP socket and the command channel until proxy_stop.
 * Returns 0 when stopped, -errno on a fatal error (bad fd), -EBUSY if already running. */
int proxy_run(proxy_t *p);

/* Ask the loop to return (sticky: a later proxy_run returns at once). Any thread. */
int proxy_stop(proxy_t *p);

/* Route net/prefixlen to peer_ip:peer_port (replacing an existing route for it). Any thread;
 * applied by the loop thread, returns once applied. -EINVAL for host bits or bad values. */
int proxy_set_route(proxy_t *p, uint32_t net, int prefixlen, uint32_t peer_ip, uint16_t peer_port);

/* Remove the route for net/prefixlen. Returns 1 if it existed, 0 if not. Any thread. */
int proxy_del_route(proxy_t *p, uint32_t net, int prefixlen);

/* Longest-prefix lookup of dst: 1 and the peer if found, 0 if not, -EBUSY while running. */
int proxy_lookup(proxy_t *p, uint32_t dst, uint32_t *peer_ip, uint16_t *peer_port);

/* Copy the counters into *out. Any thread. */
void proxy_counters(proxy_t *p, struct proxy_counters *out);
