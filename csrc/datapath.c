/* datapath.c: moving packets between the TUN and the UDP socket, in batches.
 *
 * TUN -> UDP: up to `batch` reads (a TUN has no multi-packet read), then one sendmmsg; runs
 * of equal-size packets to one peer go as one UDP GSO entry, which the kernel cuts into
 * exactly the datagrams a one-by-one send would produce (the wire stays Go's).
 * UDP -> TUN: one recvmmsg of up to `batch` datagrams; with UDP GRO the kernel may join
 * datagrams of one flow, which are split here again, then one write per packet.
 * batch=1 is Go's design: one read/sendto/recv/write per packet, no GSO/GRO.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netinet/udp.h>

#include "proxy_int.h"

#define GSO_MAX_SEGS 64          /* the kernel's UDP_MAX_SEGMENTS */
#define GSO_MAX_BYTES 65000      /* under the largest UDP payload */
#define GSO_MAX_FAILURES 16      /* GSO sends failing in a row before we stop trying */
#define GSO_CMSG_SPACE CMSG_SPACE(sizeof(uint16_t))
#define GRO_CMSG_SPACE CMSG_SPACE(sizeof(int))
#define GRO_BUFSIZE 65536

static int fatal_errno(int err)
{
    return err == EBADF || err == EINVAL || err == EFAULT || err == ENOTSOCK || err == EBADFD;
}

static int same_peer(const struct sockaddr_in *a, const struct sockaddr_in *b)
{
    return a->sin_addr.s_addr == b->sin_addr.s_addr && a->sin_port == b->sin_port;
}

/* ------------------------------------------------------------------------ TUN -> UDP */

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

static void gso_control(struct proxy *p, struct msghdr *h, int m, size_t seg)
{
    h->msg_control = p->gso_cmsgs + (size_t)m * GSO_CMSG_SPACE;
    h->msg_controllen = GSO_CMSG_SPACE;
    struct cmsghdr *cm = CMSG_FIRSTHDR(h);
    cm->cmsg_level = SOL_UDP;
    cm->cmsg_type = UDP_SEGMENT;
    cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    uint16_t size = (uint16_t)seg;
    memcpy(CMSG_DATA(cm), &size, sizeof(size));
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
        if (j - i > 1)
            gso_control(p, h, m, seg);
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
int tun_to_udp(struct proxy *p)
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
        const struct route *r = rt_lookup(&p->rt, packet_dst(buf));
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

/* ------------------------------------------------------------------------ UDP -> TUN */

static void tun_write(struct proxy *p, unsigned char *pkt, size_t len, int truncated)
{
    COUNT(p, udp_rx_packets, 1);
    COUNT(p, udp_rx_bytes, len);
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

/* the segment size of a datagram the kernel joined by GRO, 0 for a plain one */
static size_t gro_size(struct msghdr *h)
{
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(h); cm; cm = CMSG_NXTHDR(h, cm)) {
        if (cm->cmsg_level == SOL_UDP && cm->cmsg_type == UDP_GRO) {
            int size;
            memcpy(&size, CMSG_DATA(cm), sizeof(size));
            return size > 0 ? (size_t)size : 0;
        }
    }
    return 0;
}

/* one received buffer: a datagram, or several joined by GRO (all `seg` bytes but the last) */
static void deliver(struct proxy *p, unsigned char *buf, size_t len, size_t seg, int truncated)
{
    if (truncated || !seg || seg >= len) {
        tun_write(p, buf, len > p->udp_bufsize ? p->udp_bufsize : len, truncated);
        return;
    }
    for (size_t off = 0; off < len; off += seg) {
        size_t n = len - off < seg ? len - off : seg;
        COUNT(p, udp_rx_gro, 1);
        tun_write(p, buf + off, n, 0);
    }
}

static int udp_receive(struct proxy *p)
{
    COUNT(p, syscalls, 1);
    if (p->batch == 1) {
        ssize_t r = recv(p->udp_fd, p->udp_bufs, p->udp_bufsize, MSG_DONTWAIT | MSG_TRUNC);
        if (r >= 0) {
            p->in_msgs[0].msg_len = (unsigned int)r;
            p->in_msgs[0].msg_hdr.msg_flags = r > (ssize_t)p->udp_bufsize ? MSG_TRUNC : 0;
        }
        return r < 0 ? -1 : 1;
    }
    if (p->gro) {                /* the kernel shrinks msg_controllen to what it wrote */
        for (int i = 0; i < p->batch; i++)
            p->in_msgs[i].msg_hdr.msg_controllen = GRO_CMSG_SPACE;
    }
    return recvmmsg(p->udp_fd, p->in_msgs, (unsigned int)p->batch, MSG_DONTWAIT, NULL);
}

/* receive up to `batch` datagrams and write each packet to the TUN;
 * returns the number of buffers received, or -errno on a fatal error */
int udp_to_tun(struct proxy *p)
{
    int n = udp_receive(p);
    if (n < 0) {
        if (fatal_errno(errno))
            return -errno;
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            COUNT(p, read_errors, 1);
        return 0;
    }
    for (int i = 0; i < n; i++) {
        struct msghdr *h = &p->in_msgs[i].msg_hdr;
        size_t seg = p->gro ? gro_size(h) : 0;
        deliver(p, p->udp_bufs + (size_t)i * p->udp_bufsize, p->in_msgs[i].msg_len, seg,
                (h->msg_flags & MSG_TRUNC) != 0);
    }
    return n;
}

/* ------------------------------------------------------------------------ buffers */

int datapath_init(struct proxy *p)
{
    size_t n = (size_t)p->batch;
    /* one byte more than the MTU at least, so that a longer packet shows up as oversize */
    p->bufsize = ((size_t)p->mtu + 64) & ~(size_t)63;
    int one = 1;
    p->gso = p->batch > 1;
    p->gro = p->batch > 1 && setsockopt(p->udp_fd, SOL_UDP, UDP_GRO, &one, sizeof(one)) == 0;
    p->udp_bufsize = p->gro ? GRO_BUFSIZE : p->bufsize;
    p->tun_bufs = malloc(n * p->bufsize);
    p->udp_bufs = malloc(n * p->udp_bufsize);
    p->out_msgs = calloc(n, sizeof(*p->out_msgs));
    p->in_msgs = calloc(n, sizeof(*p->in_msgs));
    p->out_iov = calloc(n, sizeof(*p->out_iov));
    p->in_iov = calloc(n, sizeof(*p->in_iov));
    p->out_addr = calloc(n, sizeof(*p->out_addr));
    p->gso_msgs = calloc(n, sizeof(*p->gso_msgs));
    p->gso_cmsgs = calloc(n, GSO_CMSG_SPACE);
    p->gso_first = calloc(n, sizeof(int));
    p->gso_count = calloc(n, sizeof(int));
    p->in_cmsgs = calloc(n, GRO_CMSG_SPACE);
    if (!p->tun_bufs || !p->udp_bufs || !p->out_msgs || !p->in_msgs || !p->out_iov ||
        !p->in_iov || !p->out_addr || !p->gso_msgs || !p->gso_cmsgs || !p->gso_first ||
        !p->gso_count || !p->in_cmsgs)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++) {
        p->out_msgs[i].msg_hdr.msg_name = &p->out_addr[i];
        p->out_msgs[i].msg_hdr.msg_namelen = sizeof(p->out_addr[i]);
        p->out_msgs[i].msg_hdr.msg_iov = &p->out_iov[i];
        p->out_msgs[i].msg_hdr.msg_iovlen = 1;
        p->in_iov[i].iov_base = p->udp_bufs + i * p->udp_bufsize;
        p->in_iov[i].iov_len = p->udp_bufsize;
        p->in_msgs[i].msg_hdr.msg_iov = &p->in_iov[i];
        p->in_msgs[i].msg_hdr.msg_iovlen = 1;
        if (p->gro)
            p->in_msgs[i].msg_hdr.msg_control = p->in_cmsgs + i * GRO_CMSG_SPACE;
    }
    return 0;
}

void datapath_free(struct proxy *p)
{
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
    free(p->in_cmsgs);
}
