/* proxy_int.h: what the C files of the udp proxy share (not part of the cffi API).
 * Compiled with -D_GNU_SOURCE (build_ext.py) for sendmmsg/recvmmsg. */
#ifndef FLANNEL_PROXY_INT_H
#define FLANNEL_PROXY_INT_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "proxy.h"

#define MAX_BATCH 128
#define IPV4_MIN_HDR 20
#define ICMP_BURST 50            /* ICMP errors: a bucket of 50, refilled at 100/s */

/* one relaxed store: counters have a single writer, readers may be on other threads */
#define COUNT(p, field, n) \
    __atomic_store_n(&(p)->c.field, (p)->c.field + (uint64_t)(n), __ATOMIC_RELAXED)

/* ---- route table (rtable.c): longest-prefix match with one hash probe per prefix length */

struct route {
    uint32_t net;                /* host order, host bits zero */
    uint8_t len;
    uint8_t used;
    struct sockaddr_in peer;
};

struct rtable {
    struct route *slots;         /* open addressing, linear probing, capacity a power of 2 */
    uint32_t cap, count;
    uint32_t per_len[33];        /* routes per prefix length */
    uint8_t lens[33];            /* prefix lengths in use, longest first */
    int nlens;
};

uint32_t rt_prefix_mask(int len);
int rt_init(struct rtable *rt);
void rt_free(struct rtable *rt);
int rt_set(struct rtable *rt, uint32_t net, int len, uint32_t ip, uint16_t port);
int rt_del(struct rtable *rt, uint32_t net, int len);
const struct route *rt_lookup(const struct rtable *rt, uint32_t dst);

/* ---- the proxy (proxy.c: commands, loop, life cycle; datapath.c: packets) */

struct cmd {
    int kind, len, result, done;
    uint32_t net, ip;
    uint16_t port;
};

struct proxy {
    int tun_fd, udp_fd, cmd_fd;
    uint32_t tun_addr;           /* network order, ready for a header */
    int mtu, batch;
    size_t bufsize;              /* per TUN-side packet buffer: just over the MTU */
    size_t udp_bufsize;          /* per datagram buffer: 64 KiB when UDP GRO coalesces */
    struct rtable rt;

    pthread_mutex_t lock;        /* guards queue, running, and the table while not running */
    pthread_cond_t applied;
    struct cmd **queue;
    size_t qlen, qcap;
    int running, stopping;

    struct proxy_counters c;
    int64_t icmp_tokens;
    int64_t icmp_last_ns;

    unsigned char *tun_bufs, *udp_bufs;
    struct mmsghdr *out_msgs, *in_msgs;
    struct iovec *out_iov, *in_iov;
    struct sockaddr_in *out_addr;

    /* UDP GSO (batch > 1): runs of equal-size packets to one peer leave in one sendmmsg
     * entry that the kernel cuts into the same datagrams as sending them one by one */
    int gso, gso_failures;
    struct mmsghdr *gso_msgs;
    unsigned char *gso_cmsgs;
    int *gso_first, *gso_count;

    /* UDP GRO (batch > 1): the kernel may hand us several datagrams of one flow as one */
    int gro;
    unsigned char *in_cmsgs;
};

/* packet.c: IPv4 checks, TTL, ICMP errors */
int check_packet(struct proxy *p, const unsigned char *pkt, size_t len, int truncated);
int decrement_ttl(struct proxy *p, unsigned char *pkt);
uint32_t packet_dst(const unsigned char *pkt);
void send_net_unreachable(struct proxy *p, const unsigned char *pkt, size_t len);

/* datapath.c: moving packets between the TUN and the UDP socket */
int datapath_init(struct proxy *p);
void datapath_free(struct proxy *p);
int tun_to_udp(struct proxy *p);
int udp_to_tun(struct proxy *p);

#endif
