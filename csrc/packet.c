/* packet.c: what the proxy checks and changes in an IPv4 packet, and the ICMP errors it
 * sends back into the TUN. Dropped packets are counted by reason, never fatal. */
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "proxy_int.h"

#define ICMP_REFILL_NS 10000000LL /* one more ICMP error allowed per 10 ms */

static uint16_t get16(const unsigned char *b) { return (uint16_t)(b[0] << 8 | b[1]); }

static void put16(unsigned char *b, uint16_t v)
{
    b[0] = (unsigned char)(v >> 8);
    b[1] = (unsigned char)v;
}

static uint32_t get32(const unsigned char *b) { return (uint32_t)get16(b) << 16 | get16(b + 2); }

uint32_t packet_dst(const unsigned char *pkt) { return get32(pkt + 16); }

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
int check_packet(struct proxy *p, const unsigned char *pkt, size_t len, int truncated)
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
int decrement_ttl(struct proxy *p, unsigned char *pkt)
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
    uint32_t src = get32(pkt + 12), dst = get32(pkt + 16);
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
void send_net_unreachable(struct proxy *p, const unsigned char *pkt, size_t len)
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
