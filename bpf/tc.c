/* hopscope: tc clsact classifiers on the node's interfaces.
 *
 * Every packet passes unchanged (TC_ACT_OK). Only what the stitcher needs is
 * sent to user space: SYN/FIN/RST, the handshake's ACK at the nic, the segment
 * that starts an HTTP message (with its head) and up to HS_FOLLOW segments
 * after it when its head did not end in it. State lives in the kernel.
 */
#include <linux/pkt_cls.h>

#include "maps.h"

#define HS_ETH_HLEN 14
#define HS_IPPROTO_TCP 6
#define HS_IPPROTO_UDP 17

struct hs_pkt {
    __u32 saddr, daddr, osaddr, odaddr, vni;
    __u32 seq, ack, plen, payoff;
    __u16 sport, dport, ip_id;
    __u8 proto, flags;
};

/* The IPv4 header at off and the first 20 bytes of its L4 header (into l4), in one load
 * when the IP header has no options (two otherwise): addresses, protocol, id, L4 length.
 * Returns the L4 offset, or -1 (not IPv4, a later fragment, too short). */
static __always_inline int hs_ipv4(struct __sk_buff *skb, __u32 off, struct hs_pkt *p,
                                   __u32 *l4len, __u8 *l4)
{
    __u8 h[40];
    if (bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0 || (h[0] >> 4) != 4)
        return -1;
    __u32 ihl = (h[0] & 0xf) * 4;
    __u16 tot = ((__u16)h[2] << 8) | h[3];
    if (ihl < 20 || tot < ihl || (((h[6] << 8) | h[7]) & 0x1fff))
        return -1; /* a later fragment: no L4 header */
    p->ip_id = ((__u16)h[4] << 8) | h[5];
    p->proto = h[9];
    __builtin_memcpy(&p->saddr, h + 12, 4);
    __builtin_memcpy(&p->daddr, h + 16, 4);
    *l4len = tot - ihl;
    if (ihl == 20)
        __builtin_memcpy(l4, h + 20, 20);
    else if (bpf_skb_load_bytes(skb, off + ihl, l4, 20) < 0)
        return -1;
    return off + ihl;
}

/* The TCP header (its first 20 bytes in hdr) at off: ports, seq, ack, flags, payload. */
static __always_inline int hs_tcp(__u32 off, __u32 l4len, const __u8 *hdr, struct hs_pkt *p)
{
    p->sport = (hdr[0] << 8) | hdr[1];
    p->dport = (hdr[2] << 8) | hdr[3];
    p->seq = hs_be32(hdr + 4);
    p->ack = hs_be32(hdr + 8);
    __u32 doff = (hdr[12] >> 4) * 4;
    p->flags = hdr[13];
    if (doff < 20 || doff > l4len)
        return -1;
    p->plen = l4len - doff;
    p->payoff = off + doff;
    return 0;
}

/* Does the payload start an HTTP/1.x message (a method, or a status line)? */
static __always_inline int hs_is_start(struct __sk_buff *skb, struct hs_pkt *p)
{
    __u32 w = 0;
    if (p->plen < 4 || bpf_skb_load_bytes(skb, p->payoff, &w, 4) < 0)
        return 0;
    /* little-endian words of the first four bytes */
    switch (w) {
    case 0x20544547: /* "GET " */
    case 0x54534f50: /* "POST" */
    case 0x20545550: /* "PUT " */
    case 0x44414548: /* "HEAD" */
    case 0x454c4544: /* "DELE" */
    case 0x43544150: /* "PATC" */
    case 0x4954504f: /* "OPTI" */
    case 0x4e4e4f43: /* "CONN" */
    case 0x43415254: /* "TRAC" */
    case 0x50545448: /* "HTTP" */
        return 1;
    }
    return 0;
}

/* How many of the n bytes at pl to send: up to and including a "\r\n\r\n" among them,
 * with HS_HEAD_DONE set (a head ends in them), or all n when there is none. The first one
 * ends an HTTP head; what follows it is body, which the stitcher never reads (it counts
 * the segment's bytes by plen). Bytes that end in the pattern (a bodiless message, a
 * chunked body's end) are sent whole. Otherwise the scan works from both ends at once, 16
 * bytes a step each way, and stops at the first pattern either finds: from the front, the
 * head's end (the first blank line); from the back, the last blank line, which ends the
 * head too when the body holds none. So it costs the shorter of head and body, not the
 * body (a 150-byte response head before 870 bytes of body: 10 steps, not 55).
 * From the front, a block is looked at closely only when two '\r' stand two bytes apart
 * in it ("\r?\r": in a head, only a blank line); from the back, when it holds a '\r'.
 * Written for the verifier: the only branches on the bytes either return or leave no
 * register they looked at alive, so each step's paths join again; n is compared with no
 * position (the 16 bytes after n are zeroed instead, so that no match can run past them:
 * a version that compared, even only for the 4 windows of a payload shorter than 8
 * bytes, gave 6.1's verifier E2BIG). pl has 16 bytes to spare (struct hs_scratch). */
#define HS_HEAD_DONE 0x8000 /* above any length; hs_submit's mask takes it off */
#if HS_PAYLOAD_MAX > HS_HEAD_DONE
#error "HS_PAYLOAD_MAX must stay below HS_HEAD_DONE"
#endif
/* the bytes of a first look (a power of two, at most HS_PAYLOAD_MAX): most heads end in
 * them; a segment whose head runs on past them is copied again, up to HS_PAYLOAD_MAX - 1
 * bytes (see hs_emit_pkt) */
#ifndef HS_PAYLOAD_FIRST
#define HS_PAYLOAD_FIRST 1024
#endif
#if HS_PAYLOAD_FIRST > HS_PAYLOAD_MAX
#error "HS_PAYLOAD_FIRST must not exceed HS_PAYLOAD_MAX"
#endif
#define HS_CR8 0x0d0d0d0d0d0d0d0dULL
#define HS_CRLF2 0x0a0d0a0d /* "\r\n\r\n" as a little-endian word */
/* The high bit of every byte of w that is '\r' (a 0x0c right after a '\r' can be marked
 * too, never in a head; the blocks marked are checked exactly). */
static __always_inline __u64 hs_cr_bytes(__u64 w)
{
    w ^= HS_CR8;
    return (w - 0x0101010101010101ULL) & ~w & 0x8080808080808080ULL;
}

static __always_inline __u32 hs_head_len(__u8 *pl, __u32 n, const __u32 cap)
{
    /* kept from clang, which knows n < cap and would drop the mask: 6.1's verifier
     * refuses pl + n without the range the mask gives n */
    asm volatile("" : "+r"(n));
    n &= cap - 1;
    *(__u64 *)(pl + n) = 0;
    *(__u64 *)(pl + n + 8) = 0;
    if (n < 8) { /* a segment that continues a head can be this short */
#pragma unroll
        for (int k = 3; k >= 0; k--)
            if (*(const __u32 *)(pl + k) == HS_CRLF2)
                return (k + 4) | HS_HEAD_DONE;
        return n;
    }
    /* positions are masked for the verifier, and the empty asm keeps each mask from clang,
     * which knows 8 <= n < cap here and drops a mask it finds redundant: 6.1's verifier,
     * which may no longer know n >= 8 once n was spilled, then sees an unbounded offset */
    __u32 last = n - 4;
    asm volatile("" : "+r"(last));
    if (*(const __u32 *)(pl + (last & (cap - 1))) == HS_CRLF2)
        return n | HS_HEAD_DONE;
    __u32 j = (n - 1) >> 4; /* the next block from the back: first the one with byte n-1 */
#pragma clang loop unroll(disable)
    for (int i = 0; i < cap / 32; i++) {
        /* block i from the front: a pattern starting in it (read up to 3 bytes on) */
        __u32 o = (i << 4) & (cap - 16);
        if ((hs_cr_bytes(*(const __u64 *)(pl + o)) & hs_cr_bytes(*(const __u64 *)(pl + o + 2))) |
            (hs_cr_bytes(*(const __u64 *)(pl + o + 8)) &
             hs_cr_bytes(*(const __u64 *)(pl + o + 10)))) {
#pragma unroll
            for (int k = 0; k < 16; k++)
                if (*(const __u32 *)(pl + o + k) == HS_CRLF2)
                    return (o + k + 4) | HS_HEAD_DONE;
        }
        if (j <= i) /* that was the last block not looked at */
            break;
        /* block j from the back */
        __u32 jb = j;
        asm volatile("" : "+r"(jb));
        o = (jb & (cap / 16 - 1)) << 4;
        if (hs_cr_bytes(*(const __u64 *)(pl + o)) | hs_cr_bytes(*(const __u64 *)(pl + o + 8))) {
#pragma unroll
            for (int k = 15; k >= 0; k--)
                if (*(const __u32 *)(pl + o + k) == HS_CRLF2)
                    return (o + k + 4) | HS_HEAD_DONE;
        }
        if (j <= i + 1)
            break;
        j--;
    }
    return n;
}

static __always_inline void hs_key(struct hs_flowkey *k, struct hs_pkt *p, __u32 ifindex, int reverse)
{
    k->saddr = reverse ? p->daddr : p->saddr;
    k->daddr = reverse ? p->saddr : p->daddr;
    k->sport = reverse ? p->dport : p->sport;
    k->dport = reverse ? p->sport : p->dport;
    k->ifindex = ifindex;
    k->vni = p->vni;
}

/* Copy the first cap - 1 bytes of the payload at most into the event and cut them
 * (hs_head_len): how many to send, with HS_HEAD_DONE when a head ends in them. */
static __always_inline __u32 hs_copy_head(struct __sk_buff *skb, struct hs_pkt *p,
                                          struct hs_event *e, const __u32 cap)
{
    /* at most cap - 1 bytes, as 1 + a masked value: a bound every kernel's verifier keeps
     * (6.1's loses one a comparison gave, once spilled); the empty asm keeps the mask from
     * clang, which knows n < cap after the comparisons before it and would drop it */
    __u32 n = p->plen < cap ? p->plen : cap - 1;
    asm volatile("" : "+r"(n));
    if (n > 0 && bpf_skb_load_bytes(skb, p->payoff, e->payload, ((n - 1) & (cap - 1)) + 1) < 0)
        n = 0;
    n = hs_head_len(e->payload, n, cap);
    /* through memory: read back, n is a value the verifier does not know, so the paths
     * of hs_head_len's hundreds of constant returns join again here (else each would be
     * verified through the rest of the program: at cap 4096, past the verifier's
     * million instructions, E2BIG) */
    e->caplen = n;
    return *(volatile __u16 *)&e->caplen;
}

/* Send the packet; for a start or a follow, with its payload cut by hs_head_len.
 * Returns whether a head ends in the bytes sent (a blank line among them). */
static __always_inline int hs_emit_pkt(struct __sk_buff *skb, struct hs_pkt *p, __u8 dir, __u8 why,
                                       __u64 aux)
{
    struct hs_event *e = hs_event_new(HS_SCRATCH_TC, HS_EV_PKT, dir, 0);
    if (!e)
        return 0;
    e->aux_ns = aux;
    e->ifindex = skb->ifindex;
    e->seq = p->seq;
    e->ack = p->ack;
    e->plen = p->plen;
    e->vni = p->vni;
    e->saddr = p->saddr;
    e->daddr = p->daddr;
    e->osaddr = p->osaddr;
    e->odaddr = p->odaddr;
    e->sport = p->sport;
    e->dport = p->dport;
    e->ip_id = p->ip_id;
    e->tcp_flags = p->flags;
    e->proto = p->proto;
    e->why = why;
    __u32 n = 0;
    if (why == HS_WHY_START || why == HS_WHY_FOLLOW) {
        n = hs_copy_head(skb, p, e, HS_PAYLOAD_FIRST);
#if HS_PAYLOAD_MAX > HS_PAYLOAD_FIRST
        /* a head longer than the first look: all of it, up to HS_PAYLOAD_MAX - 1 bytes
         * (the bytes a large Cookie pushes the request's Cf-Ray to) */
        if (!(n & HS_HEAD_DONE) && p->plen >= HS_PAYLOAD_FIRST)
            n = hs_copy_head(skb, p, e, HS_PAYLOAD_MAX);
#endif
    }
    hs_submit(e, n, HS_STAT_TC_SENT, HS_STAT_TC_LOST);
    return (n & HS_HEAD_DONE) != 0;
}

/* After a start (open: its head did not end in it), or a segment that ended the head it
 * followed (open false): keep the flow's follow entry, or drop it. Looks before writing
 * (an LRU map's update and delete take a bucket lock and, for an update, a free element),
 * and not at all when no entry is open anywhere: most starts end their head in their own
 * segment, so most flows never have one. */
static __always_inline void hs_follow_set(struct hs_flowkey *k, int open)
{
    if (!open && !hs_follow_any())
        return;
    __u8 *left = follow.lookup(k);
    if (!open) {
        if (left && follow.delete(k) == 0)
            hs_follow_count(-1);
    } else if (left) {
        *left = HS_FOLLOW; /* a kept-alive connection's next open head */
    } else {
        __u8 n = HS_FOLLOW;
        if (follow.insert(k, &n) == 0)
            hs_follow_count(1);
    }
}

static __always_inline int hs_tc(struct __sk_buff *skb, __u8 dir)
{
    hs_count(HS_STAT_TC_SEEN);
    if (skb->protocol != bpf_htons(0x0800)) {
        if (skb->protocol == bpf_htons(0x86DD))
            hs_count(HS_STAT_TC_IPV6);
        return TC_ACT_OK;
    }
    __u32 ifindex = skb->ifindex;
    __u8 *rolep = ifroles.lookup(&ifindex);
    if (!rolep || !*rolep)
        return TC_ACT_OK;
    __u8 role = *rolep;
    struct hs_pkt p = {};
    p.vni = HS_NO_VNI;
    __u32 l4len = 0;
    __u8 l4[20];
    int off = hs_ipv4(skb, HS_ETH_HLEN, &p, &l4len, l4);
    if (off < 0)
        return TC_ACT_OK;
    if (p.proto == HS_IPPROTO_UDP && (role == HS_ROLE_UNDERLAY || role == HS_ROLE_NIC_UNDERLAY)) {
        /* UDP header and VXLAN header: the first 16 bytes of l4 */
        __u16 dp = (l4[2] << 8) | l4[3];
        if ((dp != HS_VXLAN_PORT && dp != HS_VXLAN_PORT2) || !(l4[8] & 0x08))
            return TC_ACT_OK;
        p.vni = ((__u32)l4[12] << 16) | ((__u32)l4[13] << 8) | l4[14];
        p.osaddr = p.saddr;
        p.odaddr = p.daddr;
        off = hs_ipv4(skb, off + 16 + HS_ETH_HLEN, &p, &l4len, l4);
        if (off < 0)
            return TC_ACT_OK;
    }
    if (p.proto != HS_IPPROTO_TCP || hs_tcp(off, l4len, l4, &p) < 0)
        return TC_ACT_OK;
    int nic = role == HS_ROLE_NIC || (role == HS_ROLE_NIC_UNDERLAY && p.vni == HS_NO_VNI);
    /* at the public NIC only the entry port's connections are requests of the model: not
     * the node's other traffic (ssh, the API server, the agent's own batches to the
     * collector, whose bytes hold request heads and would look like requests) */
    if (nic && p.sport != HS_ENTRY_PORT && p.dport != HS_ENTRY_PORT)
        return TC_ACT_OK;
    if (p.flags & 0x07) { /* SYN, FIN, RST */
        struct hs_flowkey k = {};
        if (nic && dir == HS_DIR_OUT && (p.flags & 0x12) == 0x12) {
            __u8 one = 1;
            hs_key(&k, &p, ifindex, 1);
            hs_wait.update(&k, &one);
        } else if (p.flags & 0x05) {
            /* FIN, RST: a head left open on the connection will not go on (its entry
             * would stay in the map, and in the count, until the LRU evicted it) */
            hs_key(&k, &p, ifindex, 0);
            hs_follow_set(&k, 0);
            hs_key(&k, &p, ifindex, 1);
            hs_follow_set(&k, 0);
        }
        hs_emit_pkt(skb, &p, dir, HS_WHY_CONTROL, 0);
        return TC_ACT_OK;
    }
    struct hs_flowkey k = {};
    hs_key(&k, &p, ifindex, 0);
    if (p.plen == 0) {
        if (nic && dir == HS_DIR_IN && hs_wait.lookup(&k)) {
            hs_wait.delete(&k);
            hs_emit_pkt(skb, &p, dir, HS_WHY_HS_ACK, 0);
        }
        return TC_ACT_OK;
    }
    if (hs_is_start(skb, &p)) {
        __u64 aux = 0;
#if HS_TC_PID_TGID /* tc programs may call it from 6.10 on */
        if (dir == HS_DIR_OUT && (role == HS_ROLE_OVERLAY || role == HS_ROLE_POD)) {
            /* sent inside the proxy's write (the overlay path runs in the syscall) */
            __u32 tid = (__u32)bpf_get_current_pid_tgid();
            struct hs_write_slot *w = hs_write_slot(tid);
            if (w && tid && w->tid == tid) {
                aux = w->ts;
                hs_count(HS_STAT_PROXY_WRITES);
            }
        }
#endif
        hs_follow_set(&k, !hs_emit_pkt(skb, &p, dir, HS_WHY_START, aux));
        return TC_ACT_OK;
    }
    if (!hs_follow_any()) /* no head open anywhere: a body segment, nothing to send */
        return TC_ACT_OK;
    __u8 *left = follow.lookup(&k);
    if (left) {
        /* the next HS_FOLLOW segments, or fewer: up to one that ends the head */
        __u8 more = *left;
        if (hs_emit_pkt(skb, &p, dir, HS_WHY_FOLLOW, 0) || more <= 1) {
            if (follow.delete(&k) == 0)
                hs_follow_count(-1);
        } else {
            *left = more - 1;
        }
    }
    return TC_ACT_OK;
}

int hs_tc_ingress(struct __sk_buff *skb)
{
    return hs_tc(skb, HS_DIR_IN);
}

int hs_tc_egress(struct __sk_buff *skb)
{
    return hs_tc(skb, HS_DIR_OUT);
}
