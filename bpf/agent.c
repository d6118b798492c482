/* hopscope agent: the one BPF object the agent loads. The tracepoint programs
 * are here (bcc generates their argument structs only in the main file); the
 * tc classifiers come from tc.c, and both share the maps of maps.h. Built by
 * agent/bpfprog.py with -I bpf/ and the HS_* settings as -D defines.
 *
 * Tracepoints fire for every network namespace of the machine: each event is
 * kept only when it happens in a namespace of this node (the netns_ok map).
 * Kernel structs are read at offsets taken from the running kernel's BTF
 * (HS_*_OFF defines), never from header layouts.
 */
#include "tc.c"

/* bcc declares the kfree_skb tracepoint's field as this enum (its values come
 * from the running kernel's format file, not from here): give it a complete type */
enum skb_drop_reason { HS_SKB_DROP_REASON_FROM_FORMAT };

static __always_inline __u32 hs_sock_netns(const void *sk)
{
    void *net = 0;
    bpf_probe_read_kernel(&net, sizeof(net), (char *)sk + HS_SK_NET_OFF);
    return hs_netns_of_net(net);
}

static __always_inline int hs_netns_wanted(__u32 inum)
{
    return inum && netns_ok.lookup(&inum) != 0;
}

/* The IPv4 header (20 bytes, into ip) of an skb whose network header is set, and the
 * first 14 bytes after it (into l4); 0 when it is not IPv4. */
static __always_inline int hs_skb_ipv4(void *skb, __u8 *ip, __u8 *l4)
{
    void *head = 0;
    __u16 nh = 0;
    bpf_probe_read_kernel(&head, sizeof(head), (char *)skb + HS_SKB_HEAD_OFF);
    bpf_probe_read_kernel(&nh, sizeof(nh), (char *)skb + HS_SKB_NH_OFF);
    if (!head || bpf_probe_read_kernel(ip, 20, (char *)head + nh) < 0 || (ip[0] >> 4) != 4)
        return 0;
    return bpf_probe_read_kernel(l4, 14, (char *)head + nh + (ip[0] & 0xf) * 4) == 0;
}

/* Is the IPv6 address ::ffff:a.b.c.d (an IPv4 peer of a dual-stack socket)? */
static __always_inline int hs_v4mapped(const __u8 *a6)
{
    __u32 w0 = 0, w1 = 0, w2 = 0;
    __builtin_memcpy(&w0, a6, 4);
    __builtin_memcpy(&w1, a6 + 4, 4);
    __builtin_memcpy(&w2, a6 + 8, 4);
    return w0 == 0 && w1 == 0 && w2 == 0xffff0000;
}

/* An IPv4 address from a sockaddr_in / sockaddr_in6 (v4-mapped) as tracepoints store them. */
static __always_inline __u32 hs_sockaddr_v4(const __u8 *sa, int *ok)
{
    __u16 family = sa[0] | (sa[1] << 8);
    __u32 a = 0;
    if (family == 2) {
        __builtin_memcpy(&a, sa + 4, 4);
        *ok = 1;
    } else if (family == 10 && hs_v4mapped(sa + 8)) {
        __builtin_memcpy(&a, sa + 20, 4);
        *ok = 1;
    }
    return a;
}

/* The segment (skb->data: its TCP header) reached a socket on the entry port: the
 * kernel event of "queued on the proxy's socket". */
static __always_inline void hs_kernel_emit(__u32 inum, __u32 local, __u32 remote, __u16 lport,
                                           __u16 rport, const void *skb, __u32 plen)
{
    void *data = 0;
    __u8 th[14] = {};
    bpf_probe_read_kernel(&data, sizeof(data), (const char *)skb + HS_SKB_DATA_OFF);
    if (!data || bpf_probe_read_kernel(th, sizeof(th), data) < 0)
        return;
    struct hs_event *e = hs_event_new(HS_SCRATCH_TRACE, HS_EV_KERNEL, HS_DIR_IN, inum);
    if (!e)
        return;
    e->seq = hs_be32(th + 4);
    e->ack = hs_be32(th + 8);
    e->plen = plen;
    e->saddr = remote; /* client -> server */
    e->daddr = local;
    e->sport = rport;
    e->dport = lport;
    e->tcp_flags = th[13];
    e->proto = 6;
    hs_submit(e, 0, HS_STAT_KERNEL_SENT, HS_STAT_KERNEL_LOST);
}

#if HS_TP_PROBE_SKB
/* Kernels whose tcp:tcp_probe carries the socket and the skb (6.x): the tracepoint.
 * Elsewhere (6.1 has neither field) kprobes.c's tcp_rcv_established does the same. */
TRACEPOINT_PROBE(tcp, tcp_probe)
{
    if (args->data_len == 0 || args->sport != HS_ENTRY_PORT)
        return 0;
    __u32 inum = hs_sock_netns(args->skaddr);
    if (!hs_netns_wanted(inum))
        return 0;
    int ok_l = 0, ok_r = 0;
    __u8 sa[28], da[28];
    /* to the stack: the context allows loads at constant offsets only */
    __builtin_memcpy(sa, args->saddr, sizeof(sa));
    __builtin_memcpy(da, args->daddr, sizeof(da));
    __u32 local = hs_sockaddr_v4(sa, &ok_l);
    __u32 remote = hs_sockaddr_v4(da, &ok_r);
    if (!ok_l || !ok_r)
        return 0;
    /* in tcp_rcv_established skb->data is the TCP header */
    hs_kernel_emit(inum, local, remote, args->sport, args->dport, args->skbaddr,
                   args->data_len);
    return 0;
}
#endif

#include "kprobes.c"

/* A packet freed with a drop reason, in a namespace of this node. */
TRACEPOINT_PROBE(skb, kfree_skb)
{
    __u32 reason = args->reason;
    if (reason <= HS_DROP_REASON_MIN || args->protocol != 0x0800)
        return 0;
    void *skb = args->skbaddr;
    void *dev = 0, *net = 0;
    bpf_probe_read_kernel(&dev, sizeof(dev), (char *)skb + HS_SKB_DEV_OFF);
    if (dev)
        bpf_probe_read_kernel(&net, sizeof(net), (char *)dev + HS_DEV_NET_OFF);
#if HS_TP_KFREE_RX_SK
    else if (args->rx_sk)
        bpf_probe_read_kernel(&net, sizeof(net), (char *)args->rx_sk + HS_SK_NET_OFF);
#endif
    __u32 inum = hs_netns_of_net(net);
    if (!hs_netns_wanted(inum))
        return 0;
    __u8 ip[20] = {}, l4[14] = {};
    if (!hs_skb_ipv4(skb, ip, l4))
        return 0;
    __u32 ihl = (ip[0] & 0xf) * 4;
    __u8 proto = ip[9];
    if (proto != 6 && proto != 17)
        return 0;
    struct hs_event *e = hs_event_new(HS_SCRATCH_TRACE, HS_EV_DROP, HS_DIR_IN, inum);
    if (!e)
        return 0;
    __u16 tot = (ip[2] << 8) | ip[3];
    e->aux_ns = (__u64)args->location;
    if (dev)
        bpf_probe_read_kernel(&e->ifindex, sizeof(e->ifindex), (char *)dev + HS_DEV_IFINDEX_OFF);
    __builtin_memcpy(&e->saddr, ip + 12, 4);
    __builtin_memcpy(&e->daddr, ip + 16, 4);
    e->sport = (l4[0] << 8) | l4[1];
    e->dport = (l4[2] << 8) | l4[3];
    e->ip_id = (ip[4] << 8) | ip[5];
    e->reason = reason;
    e->proto = proto;
    if (proto == 6) {
        e->seq = hs_be32(l4 + 4);
        e->ack = hs_be32(l4 + 8);
        e->tcp_flags = l4[13];
        __u32 doff = (l4[12] >> 4) * 4;
        e->plen = tot > ihl + doff ? tot - ihl - doff : 0;
    } else {
        e->plen = tot > ihl + 8 ? tot - ihl - 8 : 0;
    }
    hs_submit(e, 0, HS_STAT_DROP_SENT, HS_STAT_DROP_LOST);
    return 0;
}

/* Socket states of this node's TCP sockets on the entry port, and upstream connects: IPv4
 * sockets, and IPv6 ones whose both ends are v4-mapped (Traefik listens dual-stack on
 * [::]:80, so its client connections are AF_INET6; the tracepoint stores their IPv4
 * addresses in saddr/daddr too). */
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != 6)
        return 0;
    if (args->family != 2 &&
        !(args->family == 10 && hs_v4mapped(args->saddr_v6) && hs_v4mapped(args->daddr_v6)))
        return 0;
    int entry = args->sport == HS_ENTRY_PORT;
    if (!entry && args->newstate != 2 /* TCP_SYN_SENT */)
        return 0;
    __u32 inum = hs_sock_netns(args->skaddr);
    if (!hs_netns_wanted(inum))
        return 0;
    struct hs_event *e = hs_event_new(HS_SCRATCH_TRACE, HS_EV_STATE, HS_DIR_OUT, inum);
    if (!e)
        return 0;
    __builtin_memcpy(&e->saddr, args->saddr, 4);
    __builtin_memcpy(&e->daddr, args->daddr, 4);
    e->sport = args->sport;
    e->dport = args->dport;
    e->reason = ((__u16)args->oldstate << 8) | (args->newstate & 0xff);
    e->proto = 6;
    hs_submit(e, 0, HS_STAT_STATE_SENT, HS_STAT_STATE_LOST);
    return 0;
}

/* The proxy's write-like syscalls: a thread inside one is sending data. */
static __always_inline void hs_write_enter(void)
{
    __u64 id = bpf_get_current_pid_tgid();
    if (!hs_is_proxy(id >> 32))
        return;
    __u32 tid = (__u32)id;
    struct hs_write_slot *w = hs_write_slot(tid);
    if (w) {
        w->ts = bpf_ktime_get_ns();
        w->tid = tid;
    }
}

static __always_inline void hs_write_exit(void)
{
    __u64 id = bpf_get_current_pid_tgid();
    if (!hs_is_proxy(id >> 32))
        return;
    __u32 tid = (__u32)id;
    struct hs_write_slot *w = hs_write_slot(tid);
    if (w && w->tid == tid)
        w->tid = 0;
}

/* Which of them: HS_SC_* (agent/bpfprog.py PROXY_CALLS, --proxy-calls). Every one attached
 * runs for every such syscall of the machine, so only the proxy's own are compiled in (Go's
 * net package, Traefik's, writes with write(2) and connects with connect(2)). */
#if HS_SC_WRITE
TRACEPOINT_PROBE(syscalls, sys_enter_write) { hs_write_enter(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { hs_write_exit(); return 0; }
#endif
#if HS_SC_WRITEV
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { hs_write_enter(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { hs_write_exit(); return 0; }
#endif
#if HS_SC_SENDTO
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { hs_write_enter(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { hs_write_exit(); return 0; }
#endif
#if HS_SC_SENDMSG
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { hs_write_enter(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { hs_write_exit(); return 0; }
#endif
#if HS_SC_CONNECT
TRACEPOINT_PROBE(syscalls, sys_enter_connect) { hs_write_enter(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_connect) { hs_write_exit(); return 0; }
#endif
