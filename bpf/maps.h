/* hopscope: maps and small helpers shared by the tc and tracepoint programs.
 *
 * Settings arrive as -D defines (see agent/bpfprog.py): kernel struct offsets
 * read from BTF (never from headers, whose layouts differ from the running
 * kernel), the node's network namespace inode, the entry port, VXLAN ports.
 */
#ifndef HOPSCOPE_MAPS_H
#define HOPSCOPE_MAPS_H

#include "hopscope.h"

#ifndef HS_RINGBUF_PAGES
#define HS_RINGBUF_PAGES 1024
#endif
#ifndef HS_ENTRY_PORT
#define HS_ENTRY_PORT 80
#endif
#ifndef HS_VXLAN_PORT
#define HS_VXLAN_PORT 8472
#endif
#ifndef HS_VXLAN_PORT2
#define HS_VXLAN_PORT2 4789
#endif
#ifndef HS_FOLLOW
#define HS_FOLLOW 2
#endif

/* interface roles by ifindex (an array: its lookup is inlined, a hash's is a call) */
#ifndef HS_MAX_IFINDEX
#define HS_MAX_IFINDEX 65536
#endif

/* ring buffer submit flags: BPF_RB_NO_WAKEUP (1) by default, the reader drains on a timer
 * (a wake-up per event cost the agent half its CPU) */
#ifndef HS_RB_FLAGS
#define HS_RB_FLAGS 1
#endif

struct hs_flowkey {
    __u32 saddr;
    __u32 daddr;
    __u16 sport;
    __u16 dport;
    __u32 ifindex;
    __u32 vni;
};

BPF_RINGBUF_OUTPUT(events, HS_RINGBUF_PAGES);
BPF_PERCPU_ARRAY(stats, __u64, HS_STAT_MAX);
/* The per-CPU scratch events: one for the tc classifiers (in a softirq, or in the sending
 * task with bottom halves off) and one for the tracing programs (tracepoints and kprobes,
 * which the kernel runs one at a time per CPU). A classifier can run inside a tracing
 * program on the same CPU (a softirq on the way out of an interrupt that came while a
 * process-context tracepoint ran): sharing one would let it overwrite a half-built event. */
#define HS_SCRATCH_TC    0
#define HS_SCRATCH_TRACE 1
struct hs_scratch {
    struct hs_event e;
    __u8 slack[16]; /* hs_head_len reads and zeroes up to 16 bytes past the payload */
};
BPF_PERCPU_ARRAY(scratch, struct hs_scratch, 2);
/* ifindex -> role, for the interfaces the agent attached to */
BPF_ARRAY(ifroles, __u8, HS_MAX_IFINDEX);
/* network namespaces whose drops and socket events belong to this node */
BPF_HASH(netns_ok, __u32, __u8, 1024);
/* the proxy's processes (struct hs_proxy_set, hopscope.h): every write-like syscall of the
 * machine asks whether it is the proxy's, compared inline (a hash lookup cost more) */
BPF_ARRAY(proxy_set, struct hs_proxy_set, 1);
/* the proxy's threads inside a write-like syscall: slot tid % HS_WRITE_SLOTS holds the
 * thread and when it entered. An array, not a hash keyed by tid: its lookup is inlined, it
 * takes no lock and allocates no element (the hash's update and delete were most of the
 * syscall programs' time on the proxy's writes). Two proxy threads whose tids share a slot
 * (tids HS_WRITE_SLOTS apart), writing at the same time, lose the proxy sub-hop of one of
 * them (a slot answers only for the tid it holds); a packet of one classified in the
 * nanoseconds between the other's two stores on entry takes the other's entry time. */
#ifndef HS_WRITE_SLOTS
#define HS_WRITE_SLOTS 16384
#endif
struct hs_write_slot {
    __u32 tid;  /* 0: free */
    __u32 pad;
    __u64 ts;   /* bpf_ktime_get_ns() at the syscall's entry */
};
BPF_ARRAY(write_open, struct hs_write_slot, HS_WRITE_SLOTS);

/* The write_open slot of thread tid (never null for an array: the index is in range). */
static __always_inline struct hs_write_slot *hs_write_slot(__u32 tid)
{
    __u32 i = tid & (HS_WRITE_SLOTS - 1);
    return write_open.lookup(&i);
}
/* per half-connection at one interface: segments still to send after a message start
 * whose head did not end in its segment */
BPF_TABLE("lru_hash", struct hs_flowkey, __u8, follow, 65536);
/* how many follow entries are open, on every CPU: while none is (the common case), a
 * segment that starts no message is passed without a lookup. Counted when an insert or a
 * delete succeeds; an entry the LRU evicts (65,536 heads open at once) leaves it too high,
 * which costs lookups, never an event. */
BPF_ARRAY(follow_open, __s64, 1);

static __always_inline int hs_follow_any(void)
{
    int zero = 0;
    __s64 *n = follow_open.lookup(&zero);
    return n && *n > 0;
}

static __always_inline void hs_follow_count(__s64 d)
{
    int zero = 0;
    __s64 *n = follow_open.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, d);
}
/* handshakes waiting for their ACK at the nic (client -> server) */
BPF_TABLE("lru_hash", struct hs_flowkey, __u8, hs_wait, 16384);

static __always_inline void hs_count(int idx)
{
    __u64 *v = stats.lookup(&idx);
    if (v)
        *v += 1;
}

static __always_inline int hs_is_proxy(__u32 tgid)
{
    int zero = 0;
    struct hs_proxy_set *p = proxy_set.lookup(&zero);
    if (!p || !tgid)
        return 0;
#pragma unroll
    for (int i = 0; i < HS_MAX_PROXY; i++)
        if (p->tgid[i] == tgid)
            return 1;
    return 0;
}

/* The caller's per-CPU scratch event (HS_SCRATCH_*), its header zeroed, the fields every
 * event has set. */
static __always_inline struct hs_event *hs_event_new(int slot, __u8 kind, __u8 dir,
                                                     __u32 netns)
{
    struct hs_scratch *s = scratch.lookup(&slot);
    if (!s)
        return 0;
    struct hs_event *e = &s->e;
    __builtin_memset(e, 0, HS_EVENT_HDR);
    e->ts_mono_ns = bpf_ktime_get_ns();
    e->netns = netns;
    e->vni = HS_NO_VNI;
    e->kind = kind;
    e->dir = dir;
    return e;
}

/* A big-endian (network order) 32-bit number at b. */
static __always_inline __u32 hs_be32(const __u8 *b)
{
    return ((__u32)b[0] << 24) | ((__u32)b[1] << 16) | ((__u32)b[2] << 8) | b[3];
}

/* Send the first HS_EVENT_HDR + caplen bytes of e; count it as sent or lost. */
static __always_inline void hs_submit(struct hs_event *e, __u32 caplen, int sent, int lost)
{
    /* masked: a bound the verifier of every kernel keeps (caplen < HS_PAYLOAD_MAX) */
    caplen &= HS_PAYLOAD_MAX - 1;
    e->caplen = caplen;
    if (events.ringbuf_output(e, HS_EVENT_HDR + caplen, HS_RB_FLAGS) == 0)
        hs_count(sent);
    else
        hs_count(lost);
}

static __always_inline __u32 hs_netns_of_net(void *net)
{
    __u32 inum = 0;
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), (char *)net + HS_NET_INUM_OFF);
    return inum;
}

#endif
