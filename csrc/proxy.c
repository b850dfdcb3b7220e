/* proxy.c: the udp backend's packet loop, wire-compatible with Go flanneld's udp backend.
 *
 * TUN -> longest-prefix lookup of the destination -> the whole IP packet as one UDP datagram
 * to the peer's PublicIP:Port; UDP -> the packet written back to the TUN. TTL is decremented
 * in both directions (a ping across two hosts shows ttl=62, as with Go).
 *
 * All state lives in struct proxy; one thread runs proxy_run. Other threads change routes and
 * stop the loop through a command queue plus an eventfd, so the route table is only ever
 * touched by the loop thread while it runs (no lock on the per-packet path). This file holds
 * the commands, the poll loop and the life cycle; datapath.c moves the packets (batched, with
 * UDP GSO/GRO), packet.c checks and answers them, rtable.c routes them.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/eventfd.h>

#include "proxy_int.h"

#define MAX_ROUNDS 64            /* rounds without poll() before checking commands again */

enum { CMD_SET, CMD_DEL };

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
    if (prefixlen < 0 || prefixlen > 32 || (net & ~rt_prefix_mask(prefixlen)) || !peer_port || !peer_ip)
        return -EINVAL;
    struct cmd c = {.kind = CMD_SET, .net = net, .len = prefixlen, .ip = peer_ip, .port = peer_port};
    return submit(p, &c);
}

int proxy_del_route(proxy_t *p, uint32_t net, int prefixlen)
{
    if (prefixlen < 0 || prefixlen > 32 || (net & ~rt_prefix_mask(prefixlen)))
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
    p->icmp_tokens = ICMP_BURST;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->applied, NULL);
    p->cmd_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int err = p->cmd_fd < 0 ? -errno : datapath_init(p);
    if (!err)
        err = rt_init(&p->rt);
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
    rt_free(&p->rt);
    datapath_free(p);
    free(p);
}
