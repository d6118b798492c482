/* hopscope: kprobes, on kernels that have them (production Ubuntu/Debian nodes; the
 * test VM). Compiled into agent.c only with -DHS_KPROBES=1, and each program is
 * attached from Python only when its function is in kallsyms (agent/bpfprog.py):
 *
 *   nf_hook_slow (entry + return)  netfilter's INPUT hook for segments to the entry
 *                                  port that carry data or a SYN: UFW's own time
 *                                  and its verdict (HS_EV_NF)
 *   ip_vs_schedule (entry)         the packet IPVS schedules (its SYN: tuple, ISN)
 *   ip_vs_conn_new (entry)         ... and the real server it chose (HS_EV_IPVS);
 *                                  both arguments read are plain, no module structs
 *   tcp_rcv_established (entry)    the kernel point where tcp:tcp_probe has no skb
 *                                  (6.1): a segment reached an entry-port socket
 *
 * Kernel structs at BTF offsets (HS_*_OFF), like the rest of the agent.
 */
#ifdef HS_KPROBES

#include <uapi/linux/ptrace.h>

#define HS_NF_INET_LOCAL_IN 1
#define HS_NFPROTO_IPV4 2

struct hs_nf_pkt {
    __u64 ts;
    __u32 inum, ifindex, saddr, daddr, seq, plen;
    __u16 sport, dport, ip_id;
    __u8 flags, pad;
};

BPF_HASH(nf_open, __u32, struct hs_nf_pkt, 8192);   /* tid -> packet in nf_hook_slow */
BPF_HASH(ipvs_open, __u32, struct hs_nf_pkt, 8192); /* tid -> packet ip_vs_schedule got */

/* IPv4 + TCP headers of an skb whose network header is set; 0 when not TCP over IPv4. */
static __always_inline int hs_skb_tcp(void *skb, struct hs_nf_pkt *p)
{
    __u8 ip[20] = {}, l4[14] = {};
    if (!hs_skb_ipv4(skb, ip, l4) || ip[9] != 6)
        return 0;
    __u32 ihl = (ip[0] & 0xf) * 4;
    __builtin_memcpy(&p->saddr, ip + 12, 4);
    __builtin_memcpy(&p->daddr, ip + 16, 4);
    p->ip_id = (ip[4] << 8) | ip[5];
    p->sport = (l4[0] << 8) | l4[1];
    p->dport = (l4[2] << 8) | l4[3];
    p->seq = hs_be32(l4 + 4);
    p->flags = l4[13];
    __u16 tot = (ip[2] << 8) | ip[3];
    __u32 doff = (l4[12] >> 4) * 4;
    p->plen = tot > ihl + doff ? tot - ihl - doff : 0;
    return 1;
}

static __always_inline __u32 hs_skb_netns(void *skb, __u32 *ifindex)
{
    void *dev = 0, *net = 0;
    bpf_probe_read_kernel(&dev, sizeof(dev), (char *)skb + HS_SKB_DEV_OFF);
    if (!dev)
        return 0;
    bpf_probe_read_kernel(ifindex, sizeof(*ifindex), (char *)dev + HS_DEV_IFINDEX_OFF);
    bpf_probe_read_kernel(&net, sizeof(net), (char *)dev + HS_DEV_NET_OFF);
    return hs_netns_of_net(net);
}

static __always_inline void hs_fill(struct hs_event *e, struct hs_nf_pkt *p)
{
    e->ifindex = p->ifindex;
    e->saddr = p->saddr;
    e->daddr = p->daddr;
    e->sport = p->sport;
    e->dport = p->dport;
    e->seq = p->seq;
    e->plen = p->plen;
    e->ip_id = p->ip_id;
    e->tcp_flags = p->flags;
    e->proto = 6;
}

/* int nf_hook_slow(struct sk_buff *skb, struct nf_hook_state *state, ...) */
int hs_nf_enter(struct pt_regs *ctx)
{
    void *skb = (void *)PT_REGS_PARM1(ctx);
    void *state = (void *)PT_REGS_PARM2(ctx);
    __u8 hook = 0xff, pf = 0;
    bpf_probe_read_kernel(&hook, 1, (char *)state + HS_NFSTATE_HOOK_OFF);
    bpf_probe_read_kernel(&pf, 1, (char *)state + HS_NFSTATE_PF_OFF);
    if (hook != HS_NF_INET_LOCAL_IN || pf != HS_NFPROTO_IPV4)
        return 0;
    struct hs_nf_pkt p = {};
    if (!hs_skb_tcp(skb, &p) || p.dport != HS_ENTRY_PORT || !(p.plen || (p.flags & 0x02)))
        return 0;
    p.inum = hs_skb_netns(skb, &p.ifindex);
    if (!hs_netns_wanted(p.inum))
        return 0;
    p.ts = bpf_ktime_get_ns();
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    nf_open.update(&tid, &p);
    return 0;
}

int hs_nf_return(struct pt_regs *ctx)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct hs_nf_pkt *p = nf_open.lookup(&tid);
    if (!p)
        return 0;
    int ret = (int)PT_REGS_RC(ctx);
    __u64 now = bpf_ktime_get_ns();
    struct hs_event *e = hs_event_new(HS_SCRATCH_TRACE, HS_EV_NF, HS_DIR_IN, p->inum);
    if (e) {
        hs_fill(e, p);
        e->ts_mono_ns = p->ts;
        e->aux_ns = now - p->ts;
        e->reason = ret > 0 ? HS_NF_ACCEPT : ret == 0 ? HS_NF_QUEUED : HS_NF_DROP;
        hs_submit(e, 0, HS_STAT_NF_SENT, HS_STAT_NF_LOST);
    }
    nf_open.delete(&tid);
    return 0;
}

/* struct ip_vs_conn *ip_vs_schedule(struct ip_vs_service *svc, struct sk_buff *skb, ...) */
int hs_ipvs_schedule(struct pt_regs *ctx)
{
    void *skb = (void *)PT_REGS_PARM2(ctx);
    struct hs_nf_pkt p = {};
    if (!hs_skb_tcp(skb, &p))
        return 0;
    p.inum = hs_skb_netns(skb, &p.ifindex);
    if (!p.inum) {
        /* locally generated (the proxy's connect): no device yet, the socket's netns */
        void *sk = 0;
        bpf_probe_read_kernel(&sk, sizeof(sk), (char *)skb + HS_SKB_SK_OFF);
        if (sk)
            p.inum = hs_sock_netns(sk);
    }
    if (!hs_netns_wanted(p.inum))
        return 0;
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    ipvs_open.update(&tid, &p);
    return 0;
}

/* struct ip_vs_conn *ip_vs_conn_new(const struct ip_vs_conn_param *p, int dest_af,
 *                                   const union nf_inet_addr *daddr, __be16 dport, ...) */
int hs_ipvs_conn_new(struct pt_regs *ctx)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct hs_nf_pkt *p = ipvs_open.lookup(&tid);
    if (!p)
        return 0;
    int af = (int)PT_REGS_PARM2(ctx);
    const void *daddr = (const void *)PT_REGS_PARM3(ctx);
    __u16 dport = (__u16)PT_REGS_PARM4(ctx);
    if (af == 2) {
        struct hs_event *e = hs_event_new(HS_SCRATCH_TRACE, HS_EV_IPVS, HS_DIR_OUT, p->inum);
        if (e) {
            hs_fill(e, p);
            bpf_probe_read_kernel(&e->osaddr, 4, daddr);
            e->reason = bpf_ntohs(dport);
            hs_submit(e, 0, HS_STAT_IPVS_SENT, HS_STAT_IPVS_LOST);
        }
    }
    ipvs_open.delete(&tid);
    return 0;
}

#if !HS_TP_PROBE_SKB
/* void tcp_rcv_established(struct sock *sk, struct sk_buff *skb): skb->data is the TCP
 * header; the socket gives the addresses (IPv4, or IPv4-mapped: the v4 fields are set). */
int hs_tcp_rcv(struct pt_regs *ctx)
{
    void *sk = (void *)PT_REGS_PARM1(ctx);
    void *skb = (void *)PT_REGS_PARM2(ctx);
    __u16 lport = 0, rport = 0;
    bpf_probe_read_kernel(&lport, 2, (char *)sk + HS_SKC_NUM_OFF);
    if (lport != HS_ENTRY_PORT)
        return 0;
    __u32 inum = hs_sock_netns(sk);
    if (!hs_netns_wanted(inum))
        return 0;
    __u32 len = 0, local = 0, remote = 0;
    void *data = 0;
    __u8 doff = 0;
    bpf_probe_read_kernel(&len, 4, (char *)skb + HS_SKB_LEN_OFF);
    bpf_probe_read_kernel(&data, sizeof(data), (char *)skb + HS_SKB_DATA_OFF);
    if (!data || bpf_probe_read_kernel(&doff, 1, (char *)data + 12) < 0)
        return 0;
    __u32 hl = (doff >> 4) * 4;
    if (len <= hl)
        return 0; /* no data */
    bpf_probe_read_kernel(&rport, 2, (char *)sk + HS_SKC_DPORT_OFF);
    bpf_probe_read_kernel(&local, 4, (char *)sk + HS_SKC_RCV_SADDR_OFF);
    bpf_probe_read_kernel(&remote, 4, (char *)sk + HS_SKC_DADDR_OFF);
    hs_kernel_emit(inum, local, remote, lport, bpf_ntohs(rport), skb, len - hl);
    return 0;
}
#endif

#endif /* HS_KPROBES */
