/* rtable.c: the proxy's route table, peer subnet -> peer address.
 *
 * One open-addressing hash keyed by (network, prefix length) plus the list of prefix lengths
 * in use: a lookup probes once per length present, longest first, so with 1000 peers (all
 * of one SubnetLen) it is one probe, never a scan. Only the proxy's loop thread touches it
 * while the loop runs.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>

#include "proxy_int.h"

uint32_t rt_prefix_mask(int len)
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

int rt_init(struct rtable *rt)
{
    memset(rt, 0, sizeof(*rt));
    return rt_grow(rt);
}

void rt_free(struct rtable *rt)
{
    free(rt->slots);
    rt->slots = NULL;
}

int rt_set(struct rtable *rt, uint32_t net, int len, uint32_t ip, uint16_t port)
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
int rt_del(struct rtable *rt, uint32_t net, int len)
{
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

const struct route *rt_lookup(const struct rtable *rt, uint32_t dst)
{
    for (int n = 0; n < rt->nlens; n++) {
        int len = rt->lens[n];
        const struct route *r = &rt->slots[rt_slot(rt, dst & rt_prefix_mask(len), len)];
        if (r->used)
            return r;
    }
    return NULL;
}
