/* proxy.c: the udp backend's data path, wire-compatible with Go flanneld's udp backend.
 *
 * TUN -> longest-prefix lookup of the destination -> the whole IP packet as one UDP datagram
 * to the peer's PublicIP:Port; UDP -> the packet written back to the TUN. TTL is decremented
 * in both directions (a ping across two hosts shows ttl=62, as with Go).
 *
 * All state lives in struct proxy; one thread runs proxy_run. Other threads change routes and
 * stop the loop through a command queue plus an eventfd, so the route table is only ever
 * touched by the loop thread while it runs (no lock on the per-packet path).
 *
 * Unlike Go's proxy (one packet per system call), up to `batch` packets move per call:
 * recvmmsg/sendmmsg on the UDP socket, and bounded read loops on the TUN (which has no
 * multi-packet read); runs of equal-size packets to one peer go out as one UDP GSO send,
 * which the kernel cuts into exactly the datagrams Go would send. batch=1 keeps Go's design
 * (no GSO, one packet per system call) for comparison.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include "proxy.h"

#define MAX_BATCH 128
#define MAX_ROUNDS 64            /* rounds without poll() before checking commands again */
#define IPV4_MIN_HDR 20
#define ICMP_BURST 50            /* ICMP errors: bucket of 50, refilled at 100/s */
#define ICMP_REFILL_NS 10000000LL
#define GSO_MAX_SEGS 64          /* the kernel's UDP_MAX_SEGMENTS */
#define GSO_MAX_BYTES 65000      /* under the largest UDP payload */
#define GSO_MAX_FAILURES 16     /* GSO sends failing in a row before we stop trying */
#define GSO_CMSG_SPACE CMSG_SPACE(sizeof(uint16_t))

/* one relaxed store: counters have a single writer, readers may be on other threads */
#define COUNT(p, field, n) \
    __atomic_store_n(&(p)->c.field, (p)->c.field + (uint64_t)(n), __ATOMIC_RELAXED)

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

enum { CMD_SET, CMD_DEL };

struct cmd {
    int kind, len, result, done;
    uint32_t net, ip;
    uint16_t port;
};

struct proxy {
    int tun_fd, udp_fd, cmd_fd;
    uint32_t tun_addr;           /* network order, ready for a header */
    int mtu, batch;
    size_t bufsize;
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
};

/* ------------------------------------------------------------------------ route table */

static uint32_t prefix_mask(int len)
{
    return len ? 0xffffffffu << (32 - len) : 0;
}

static uint32_t rt_hash(uint32_t net, int len, uint32_t cap)
{
    uint64_t key = ((uint64_t)net << 6 | (uint64_t)len) * 0x9e3779b97f4a7c15ull;
    return (uint32_t)(key >> 32) & (cap - 1);
}

/* index of the slot holding net/len, or of the empty slot where it would go */
static uint32_t rt_slot(const struct rtable *rt, uint32_t net, int len)
{
    uint32_t i = rt_hash(net, len, rt->cap);
    while (rt->slots[i].used && (rt->slots[i].net != net || rt->slots[i].len != len))
        i = (i + 1) & (rt->cap - 1);
    return i;
}

static void rt_update_lens(struct rtable *rt)
{
    rt->nlens = 0;
    for (int len = 32; len >= 0; len--)
        if (rt->per_len[len])
            rt->lens[rt->nlens++] = (uint8_t)len;
}

static int rt_grow(struct rtable *rt)
{
    uint32_t cap = rt->cap ? rt->cap * 2 : 64;
    struct route *old = rt->slots, *slots = calloc(cap, sizeof(*slots));
    if (!slots)
        return -ENOMEM;
    uint32_t old_cap = rt->cap;
    rt->slots = slots;
    rt->cap = cap;
    for (uint32_t i = 0; i < old_cap; i++)
        if (old[i].used)
            slots[rt_slot(rt, old[i].net, old[i].len)] = old[i];
    free(old);
    return 0;
}

static int rt_set(struct rtable *rt, uint32_t net, int len, uint32_t ip, uint16_t port)
{
    if ((rt->count + 1) * 2 > rt->cap && rt_grow(rt) < 0)
        return -ENOMEM;
    struct route *r = &rt->slots[rt_slot(rt, net, len)];
    if (!r->used) {
        r->used = 1;
        r->net = net;
        r->len = (uint8_t)len;
        rt->count++;
        if (rt->per_len[len]++ == 0)
            rt_update_lens(rt);
    }
    memset(&r->peer, 0, sizeof(r->peer));
    r->peer.sin_family = AF_INET;
    r->peer.sin_addr.s_addr = htonl(ip);
    r->peer.sin_port = htons(port);
    return 0;
}

/* backward-shift deletion keeps probe chains intact without tombstones */
static int rt_del(struct rtable *rt, uint32_t net, int len)
{
    if (!rt->cap)
        return 0;
    uint32_t mask = rt->cap - 1, i = rt_slot(rt, net, len), j = i;
    if (!rt->slots[i].used)
        return 0;
    rt->count--;
    if (--rt->per_len[len] == 0)
        rt_update_lens(rt);
    for (;;) {
        rt->slots[i].used = 0;
        for (;;) {
            j = (j + 1) & mask;
            if (!rt->slots[j].used)
                return 1;
            uint32_t k = rt_hash(rt->slots[j].net, rt->slots[j].len, rt->cap);
            /* entry j may stay unless its home k is cyclically outside (i, j] */
            if (i <= j ? (i < k && k <= j) : (i < k || k <= j))
                continue;
            break;
        }
        rt->slots[i] = rt->slots[j];
        i = j;
    }
}

static const struct route *rt_lookup(const struct rtable *rt, uint32_t dst)
{
    for (int n = 0; n < rt->nlens; n++) {
        int len = rt->lens[n];
        const struct route *r = &rt->slots[rt_slot(rt, dst & prefix_mask(len), len)];
        if (r->used)
            return r;
    }
    return NULL;
}

/* ------------------------------------------------------------------------ packet helpers */

static uint16_t get16(const unsigned char *b) { return (uint16_t)(b[0] << 8 | b[1]); }

static void put16(unsigned char *b, uint16_t v)
{
    b[0] = (unsigned char)(v >> 8);
    b[1] = (unsigned char)v;
}

static uint16_t checksum(const unsigned char *b, size_t len)
{
    uint32_t sum = 0;
    for (; len > 1; b += 2, len -= 2)
        sum += get16(b);
    if (len)
        sum += (uint32_t)b[0] << 8;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* 0 if pkt[0..len) is an IPv4 packet we may forward, else the drop is counted and -1 returned */
static int check_packet(struct proxy *p, const unsigned char *pkt, size_t len, int truncated)
{
    if (truncated || len > (size_t)p->mtu) {
        COUNT(p, drop_oversize, 1);
        return -1;
    }
    if (len < IPV4_MIN_HDR) {
        COUNT(p, drop_runt, 1);
        return -1;
    }
    size_t ihl = (size_t)(pkt[0] & 0x0f) * 4, total = get16(pkt + 2);
    if ((pkt[0] >> 4) != 4 || ihl < IPV4_MIN_HDR || ihl > len || total < ihl || total > len) {
        COUNT(p, drop_bad_header, 1);
        return -1;
    }
    return 0;
}

/* RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), for the TTL/protocol word */
static int decrement_ttl(struct proxy *p, unsigned char *pkt)
{
    if (pkt[8] <= 1) {
        COUNT(p, drop_ttl, 1);
        return -1;
    }
    uint16_t old = get16(pkt + 8);
    pkt[8]--;
    uint32_t sum = (uint16_t)~get16(pkt + 10) + (uint16_t)~old + get16(pkt + 8);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    put16(pkt + 10, (uint16_t)~sum);
    return 0;
}

/* RFC 1812 4.3.2.7: no ICMP error about an ICMP error, a non-first fragment, or a packet
 * from/to a non-unicast address; informational ICMP (echo etc.) does get one. */
static int may_answer(const unsigned char *pkt, size_t len, size_t ihl)
{
    uint32_t src = (uint32_t)get16(pkt + 12) << 16 | get16(pkt + 14);
    uint32_t dst = (uint32_t)get16(pkt + 16) << 16 | get16(pkt + 18);
    if (get16(pkt + 6) & 0x1fff)
        return 0;
    if (src == 0 || (src >> 28) >= 14 || (src >> 24) == 127 || (dst >> 28) >= 14)
        return 0;
    if (pkt[9] == IPPROTO_ICMP) {
        if (len <= ihl)
            return 0;
        switch (pkt[ihl]) {
        case 0: case 8: case 9: case 10: case 13: case 14: case 15: case 16: case 17: case 18:
            return 1;
        default:
            return 0;
        }
    }
    return 1;
}

static int icmp_token(struct proxy *p)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t now = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    int64_t earned = (now - p->icmp_last_ns) / ICMP_REFILL_NS;
    if (earned > 0) {
        p->icmp_tokens = p->icmp_tokens + earned > ICMP_BURST ? ICMP_BURST : p->icmp_tokens + earned;
        p->icmp_last_ns += earned * ICMP_REFILL_NS;
    }
    if (p->icmp_tokens <= 0)
        return 0;
    p->icmp_tokens--;
    return 1;
}

/* ICMP destination/net unreachable from the TUN address back to the sender, quoting the
 * offending header and the first 8 bytes of its payload (RFC 792) */
static void send_net_unreachable(struct proxy *p, const unsigned char *pkt, size_t len)
{
    size_t ihl = (size_t)(pkt[0] & 0x0f) * 4;
    if (!may_answer(pkt, len, ihl) || !icmp_token(p))
        return;
    size_t quote = len < ihl + 8 ? len : ihl + 8, total = IPV4_MIN_HDR + 8 + quote;
    unsigned char out[IPV4_MIN_HDR + 8 + 60 + 8];
    memset(out, 0, sizeof(out));
    out[0] = 0x45;
    out[1] = 0xc0;               /* internetwork control, as the kernel's ICMP errors */
    put16(out + 2, (uint16_t)total);
    out[8] = 64;
    out[9] = IPPROTO_ICMP;
    memcpy(out + 12, &p->tun_addr, 4);
    memcpy(out + 16, pkt + 12, 4);
    put16(out + 10, checksum(out, IPV4_MIN_HDR));
    unsigned char *icmp = out + IPV4_MIN_HDR;
    icmp[0] = 3;                 /* destination unreachable */
    icmp[1] = 0;                 /* net unreachable */
    memcpy(icmp + 8, pkt, quote);
    put16(icmp + 2, checksum(icmp, 8 + quote));
    COUNT(p, syscalls, 1);
    if (write(p->tun_fd, out, total) == (ssize_t)total)
        COUNT(p, icmp_sent, 1);
    else
        COUNT(p, drop_send_error, 1);
}

/* ------------------------------------------------------------------------ data path */

static int fatal_errno(int err)
{
    return err == EBADF || err == EINVAL || err == EFAULT || err == ENOTSOCK || err == EBADFD;
}

static int same_peer(const struct sockaddr_in *a, const struct sockaddr_in *b)
{
    return a->sin_addr.s_addr == b->sin_addr.s_addr && a->sin_port == b->sin_port;
}

/* send out_msgs[i..n) as they are, one datagram each */
static void udp_send_plain(struct proxy *p, int i, int n)
{
    while (i < n) {
        int sent;
        COUNT(p, syscalls, 1);
        if (p->batch == 1 || n - i == 1) {
            struct msghdr *h = &p->out_msgs[i].msg_hdr;
            ssize_t r = sendto(p->udp_fd, h->msg_iov->iov_base, h->msg_iov->iov_len, 0,
                               (struct sockaddr *)h->msg_name, h->msg_namelen);
            sent = r < 0 ? -1 : 1;
            if (r >= 0)
                p->out_msgs[i].msg_len = (unsigned int)r;
        } else {
            sent = sendmmsg(p->udp_fd, p->out_msgs + i, (unsigned int)(n - i), 0);
        }
        if (sent < 0) {
            if (errno != EINTR) {  /* the failed message is dropped, the rest still go */
                COUNT(p, drop_send_error, 1);
                i++;
            }
            continue;
        }
        for (int k = i; k < i + sent; k++)
            COUNT(p, udp_tx_bytes, p->out_msgs[k].msg_len);
        COUNT(p, udp_tx_packets, sent);
        i += sent;
    }
}

/* group out_msgs[0..n) into GSO runs: same peer, equal sizes (the last may be shorter) */
static int gso_group(struct proxy *p, int n)
{
    int m = 0;
    for (int i = 0; i < n; m++) {
        size_t seg = p->out_iov[i].iov_len, total = seg;
        int j = i + 1;
        while (j < n && j - i < GSO_MAX_SEGS && same_peer(&p->out_addr[j], &p->out_addr[i]) &&
               p->out_iov[j].iov_len <= seg && total + p->out_iov[j].iov_len <= GSO_MAX_BYTES) {
            total += p->out_iov[j].iov_len;
            if (p->out_iov[j++].iov_len < seg)
                break;
        }
        struct msghdr *h = &p->gso_msgs[m].msg_hdr;
        memset(h, 0, sizeof(*h));
        h->msg_name = &p->out_addr[i];
        h->msg_namelen = sizeof(p->out_addr[i]);
        h->msg_iov = &p->out_iov[i];  /* the run's buffers, in order, make one payload */
        h->msg_iovlen = (size_t)(j - i);
        if (j - i > 1) {
            h->msg_control = p->gso_cmsgs + (size_t)m * GSO_CMSG_SPACE;
            h->msg_controllen = GSO_CMSG_SPACE;
            struct cmsghdr *cm = CMSG_FIRSTHDR(h);
            cm->cmsg_level = SOL_UDP;
            cm->cmsg_type = UDP_SEGMENT;
            cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t size = (uint16_t)seg;
            memcpy(CMSG_DATA(cm), &size, sizeof(size));
        }
        p->gso_first[m] = i;
        p->gso_count[m] = j - i;
        i = j;
    }
    return m;
}

static void udp_send(struct proxy *p, int n)
{
    if (!p->gso || n < 2) {
        udp_send_plain(p, 0, n);
        return;
    }
    int m = gso_group(p, n);
    for (int k = 0; k < m;) {
        COUNT(p, syscalls, 1);
        int sent = sendmmsg(p->udp_fd, p->gso_msgs + k, (unsigned int)(m - k), 0);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            /* EIO: the socket can never do GSO (IPsec, no checksum offload); EINVAL may be
             * one odd run (larger than the path MTU) or for good (checksums turned off) */
            if (errno == EIO || ++p->gso_failures >= GSO_MAX_FAILURES)
                p->gso = 0;
            /* this run goes one datagram at a time, so only a bad packet itself is lost */
            udp_send_plain(p, p->gso_first[k], p->gso_first[k] + p->gso_count[k]);
            k++;
            continue;
        }
        p->gso_failures = 0;
        for (int i = k; i < k + sent; i++) {
            COUNT(p, udp_tx_bytes, p->gso_msgs[i].msg_len);
            COUNT(p, udp_tx_packets, p->gso_count[i]);
            if (p->gso_count[i] > 1)
                COUNT(p, udp_tx_gso, p->gso_count[i]);
        }
        k += sent;
    }
}

/* read up to `batch` packets from the TUN and send the routable ones in one go;
 * returns the number of packets read, or -errno on a fatal error */
static int tun_to_udp(struct proxy *p)
{
    int nread = 0, nout = 0;
    for (; nread < p->batch; nread++) {
        unsigned char *buf = p->tun_bufs + (size_t)nread * p->bufsize;
        COUNT(p, syscalls, 1);
        ssize_t len = read(p->tun_fd, buf, p->bufsize);
        if (len < 0) {
            if (fatal_errno(errno))
                return -errno;
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                COUNT(p, read_errors, 1);
            break;
        }
        COUNT(p, tun_rx_packets, 1);
        COUNT(p, tun_rx_bytes, len);
        if (check_packet(p, buf, (size_t)len, 0) < 0)
            continue;
        uint32_t dst = (uint32_t)get16(buf + 16) << 16 | get16(buf + 18);
        const struct route *r = rt_lookup(&p->rt, dst);
        if (!r) {
            COUNT(p, drop_no_route, 1);
            send_net_unreachable(p, buf, (size_t)len);
            continue;
        }
        if (decrement_ttl(p, buf) < 0)
            continue;
        p->out_addr[nout] = r->peer;
        p->out_iov[nout].iov_base = buf;
        p->out_iov[nout].iov_len = (size_t)len;
        nout++;
    }
    if (nout)
        udp_send(p, nout);
    return nread;
}

static void tun_write(struct proxy *p, unsigned char *pkt, size_t len, int truncated)
{
    if (check_packet(p, pkt, len, truncated) < 0 || decrement_ttl(p, pkt) < 0)
        return;
    COUNT(p, syscalls, 1);
    if (write(p->tun_fd, pkt, len) == (ssize_t)len) {
        COUNT(p, tun_tx_packets, 1);
        COUNT(p, tun_tx_bytes, len);
    } else {
        COUNT(p, drop_send_error, 1);
    }
}

/* receive up to `batch` datagrams and write each packet to the TUN;
 * returns the number received, or -errno on a fatal error */
static int udp_to_tun(struct proxy *p)
{
    int n;
    COUNT(p, syscalls, 1);
    if (p->batch == 1) {
        ssize_t r = recv(p->udp_fd, p->udp_bufs, p->bufsize, MSG_DONTWAIT | MSG_TRUNC);
        n = r < 0 ? -1 : 1;
        if (r >= 0) {
            p->in_msgs[0].msg_len = (unsigned int)r;
            p->in_msgs[0].msg_hdr.msg_flags = r > (ssize_t)p->bufsize ? MSG_TRUNC : 0;
        }
    } else {
        n = recvmmsg(p->udp_fd, p->in_msgs, (unsigned int)p->batch, MSG_DONTWAIT, NULL);
    }
    if (n < 0) {
        if (fatal_errno(errno))
            return -errno;
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            COUNT(p, read_errors, 1);
        return 0;
    }
    for (int i = 0; i < n; i++) {
        size_t len = p->in_msgs[i].msg_len;
        int truncated = (p->in_msgs[i].msg_hdr.msg_flags & MSG_TRUNC) != 0;
        COUNT(p, udp_rx_packets, 1);
        COUNT(p, udp_rx_bytes, len);
        tun_write(p, p->udp_bufs + (size_t)i * p->bufsize, len > p->bufsize ? p->bufsize : len,
                  truncated);
    }
    return n;
}

/* ------------------------------------------------------------------------ commands */

static int apply_cmd(struct proxy *p, const struct cmd *c)
{
    int r = c->kind == CMD_SET ? rt_set(&p->rt, c->net, c->len, c->ip, c->port)
                               : rt_del(&p->rt, c->net, c->len);
    __atomic_store_n(&p->c.routes, p->rt.count, __ATOMIC_RELAXED);
    return r;
}

/* caller holds p->lock */
static void apply_queue(struct proxy *p)
{
    for (size_t i = 0; i < p->qlen; i++) {
        p->queue[i]->result = apply_cmd(p, p->queue[i]);
        p->queue[i]->done = 1;
    }
    if (p->qlen)
        pthread_cond_broadcast(&p->applied);
    p->qlen = 0;
}

static void wake(struct proxy *p)
{
    uint64_t one = 1;
    /* EAGAIN means the counter is already non-zero: the loop will wake anyway */
    if (write(p->cmd_fd, &one, sizeof(one)) < 0 && errno != EAGAIN) {
        /* nothing else can be done from here; the loop also checks `stopping` per round */
    }
}

static int submit(struct proxy *p, struct cmd *c)
{
    pthread_mutex_lock(&p->lock);
    if (!p->running) {           /* the loop is not touching the table: change it here */
        c->result = apply_cmd(p, c);
        pthread_mutex_unlock(&p->lock);
        return c->result;
    }
    if (p->qlen == p->qcap) {
        size_t cap = p->qcap ? p->qcap * 2 : 16;
        struct cmd **q = realloc(p->queue, cap * sizeof(*q));
        if (!q) {
            pthread_mutex_unlock(&p->lock);
            return -ENOMEM;
        }
        p->queue = q;
        p->qcap = cap;
    }
    p->queue[p->qlen++] = c;
    wake(p);
    while (!c->done)             /* the loop drains the queue before it returns */
        pthread_cond_wait(&p->applied, &p->lock);
    pthread_mutex_unlock(&p->lock);
    return c->result;
}

int proxy_set_route(proxy_t *p, uint32_t net, int prefixlen, uint32_t peer_ip, uint16_t peer_port)
{
    if (prefixlen < 0 || prefixlen > 32 || (net & ~prefix_mask(prefixlen)) || !peer_port || !peer_ip)
        return -EINVAL;
    struct cmd c = {.kind = CMD_SET, .net = net, .len = prefixlen, .ip = peer_ip, .port = peer_port};
    return submit(p, &c);
}

int proxy_del_route(proxy_t *p, uint32_t net, int prefixlen)
{
    if (prefixlen < 0 || prefixlen > 32 || (net & ~prefix_mask(prefixlen)))
        return -EINVAL;
    struct cmd c = {.kind = CMD_DEL, .net = net, .len = prefixlen};
    return submit(p, &c);
}

int proxy_lookup(proxy_t *p, uint32_t dst, uint32_t *peer_ip, uint16_t *peer_port)
{
    int r = 0;
    pthread_mutex_lock(&p->lock);
    if (p->running) {
        r = -EBUSY;
    } else {
        const struct route *rt = rt_lookup(&p->rt, dst);
        if (rt) {
            *peer_ip = ntohl(rt->peer.sin_addr.s_addr);
            *peer_port = ntohs(rt->peer.sin_port);
            r = 1;
        }
    }
    pthread_mutex_unlock(&p->lock);
    return r;
}

int proxy_stop(proxy_t *p)
{
    __atomic_store_n(&p->stopping, 1, __ATOMIC_RELEASE);
    wake(p);
    return 0;
}

void proxy_counters(proxy_t *p, struct proxy_counters *out)
{
    const uint64_t *src = (const uint64_t *)&p->c;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

/* ------------------------------------------------------------------------ loop */

static int stopping(struct proxy *p)
{
    return __atomic_load_n(&p->stopping, __ATOMIC_ACQUIRE);
}

/* move packets until both sides are idle, for at most MAX_ROUNDS rounds; a side is read
 * again only while it fills whole batches (a shorter batch means its queue ran empty) */
static int forward(struct proxy *p, int tun_ready, int udp_ready)
{
    for (int round = 0; round < MAX_ROUNDS && (tun_ready || udp_ready) && !stopping(p); round++) {
        if (tun_ready) {
            int n = tun_to_udp(p);
            if (n < 0)
                return n;
            tun_ready = n == p->batch;
        }
        if (udp_ready) {
            int n = udp_to_tun(p);
            if (n < 0)
                return n;
            udp_ready = n == p->batch;
        }
    }
    return 0;
}

static int run_loop(struct proxy *p)
{
    struct pollfd fds[3] = {
        {.fd = p->cmd_fd, .events = POLLIN},
        {.fd = p->tun_fd, .events = POLLIN},
        {.fd = p->udp_fd, .events = POLLIN},
    };
    while (!stopping(p)) {
        COUNT(p, polls, 1);
        if (poll(fds, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (fds[0].revents & POLLIN) {
            uint64_t n;
            if (read(p->cmd_fd, &n, sizeof(n)) < 0 && errno != EAGAIN)
                return -errno;
            pthread_mutex_lock(&p->lock);
            apply_queue(p);
            pthread_mutex_unlock(&p->lock);
        }
        if ((fds[1].revents | fds[2].revents) & POLLNVAL)
            return -EBADF;
        if ((fds[1].revents & POLLHUP) || (fds[1].revents & (POLLERR | POLLIN)) == POLLERR)
            return -EPIPE;       /* the TUN (or its stand-in) went away */
        int r = forward(p, fds[1].revents & POLLIN, fds[2].revents & (POLLIN | POLLERR));
        if (r < 0)
            return r;
    }
    return 0;
}

int proxy_run(proxy_t *p)
{
    pthread_mutex_lock(&p->lock);
    if (p->running) {
        pthread_mutex_unlock(&p->lock);
        return -EBUSY;
    }
    p->running = 1;
    apply_queue(p);
    pthread_mutex_unlock(&p->lock);

    int rc = run_loop(p);

    pthread_mutex_lock(&p->lock);
    apply_queue(p);              /* release every waiting submitter */
    p->running = 0;
    pthread_mutex_unlock(&p->lock);
    return rc;
}

/* ------------------------------------------------------------------------ life cycle */

static int alloc_buffers(struct proxy *p)
{
    size_t n = (size_t)p->batch;
    p->tun_bufs = malloc(n * p->bufsize);
    p->udp_bufs = malloc(n * p->bufsize);
    p->out_msgs = calloc(n, sizeof(*p->out_msgs));
    p->in_msgs = calloc(n, sizeof(*p->in_msgs));
    p->out_iov = calloc(n, sizeof(*p->out_iov));
    p->in_iov = calloc(n, sizeof(*p->in_iov));
    p->out_addr = calloc(n, sizeof(*p->out_addr));
    p->gso_msgs = calloc(n, sizeof(*p->gso_msgs));
    p->gso_cmsgs = calloc(n, GSO_CMSG_SPACE);
    p->gso_first = calloc(n, sizeof(int));
    p->gso_count = calloc(n, sizeof(int));
    if (!p->tun_bufs || !p->udp_bufs || !p->out_msgs || !p->in_msgs || !p->out_iov ||
        !p->in_iov || !p->out_addr || !p->gso_msgs || !p->gso_cmsgs || !p->gso_first ||
        !p->gso_count)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++) {
        p->out_msgs[i].msg_hdr.msg_name = &p->out_addr[i];
        p->out_msgs[i].msg_hdr.msg_namelen = sizeof(p->out_addr[i]);
        p->out_msgs[i].msg_hdr.msg_iov = &p->out_iov[i];
        p->out_msgs[i].msg_hdr.msg_iovlen = 1;
        p->in_iov[i].iov_base = p->udp_bufs + i * p->bufsize;
        p->in_iov[i].iov_len = p->bufsize;
        p->in_msgs[i].msg_hdr.msg_iov = &p->in_iov[i];
        p->in_msgs[i].msg_hdr.msg_iovlen = 1;
    }
    return 0;
}

proxy_t *proxy_new(int tun_fd, int udp_fd, uint32_t tun_addr, int mtu, int batch)
{
    if (tun_fd < 0 || udp_fd < 0 || mtu < 68 || mtu > 65535 || batch < 1 || batch > MAX_BATCH) {
        errno = EINVAL;
        return NULL;
    }
    int flags = fcntl(tun_fd, F_GETFL);
    if (flags < 0 || fcntl(tun_fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return NULL;
    struct proxy *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    p->tun_fd = tun_fd;
    p->udp_fd = udp_fd;
    p->tun_addr = htonl(tun_addr);
    p->mtu = mtu;
    p->batch = batch;
    /* one byte more than the MTU, so that a longer packet shows up as oversize */
    p->bufsize = ((size_t)mtu + 64) & ~(size_t)63;
    p->icmp_tokens = ICMP_BURST;
    p->gso = batch > 1;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->applied, NULL);
    p->cmd_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int err = p->cmd_fd < 0 ? -errno : alloc_buffers(p);
    if (!err)
        err = rt_grow(&p->rt);
    if (err) {
        proxy_free(p);
        errno = -err;
        return NULL;
    }
    return p;
}

void proxy_free(proxy_t *p)
{
    if (!p)
        return;
    if (p->cmd_fd >= 0)
        close(p->cmd_fd);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->applied);
    free(p->queue);
    free(p->rt.slots);
    free(p->tun_bufs);
    free(p->udp_bufs);
    free(p->out_msgs);
    free(p->in_msgs);
    free(p->out_iov);
    free(p->in_iov);
    free(p->out_addr);
    free(p->gso_msgs);
    free(p->gso_cmsgs);
    free(p->gso_first);
    free(p->gso_count);
    free(p);
}
