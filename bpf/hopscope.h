/* hopscope: the events the agent's BPF programs emit, and the constants they share.
 *
 * One header for the kernel side (the programs in bpf/, compiled by bcc) and the user side
 * (agent/events.py mirrors struct hs_event and the constants; tests/test_agent_events.py
 * checks the mirror against this file with a C compiler). Only fixed-width types: the
 * layout is the same for every compiler that builds it.
 */
#ifndef HOPSCOPE_H
#define HOPSCOPE_H

/* event kinds */
#define HS_EV_PKT    1  /* a packet at a tc hook (nic, overlay, underlay, pod) */
#define HS_EV_KERNEL 2  /* a data segment reached the proxy's socket (tcp:tcp_probe) */
#define HS_EV_DROP   3  /* skb:kfree_skb with a drop reason */
#define HS_EV_STATE  4  /* sock:inet_sock_set_state of a socket the node cares about */
#define HS_EV_NF     5  /* kprobe: a segment to the entry port through netfilter's INPUT hook */
#define HS_EV_IPVS   6  /* kprobe: IPVS scheduled a new connection to a real server */

/* directions */
#define HS_DIR_IN  0
#define HS_DIR_OUT 1

/* interface roles (the value of the ifroles map) */
#define HS_ROLE_NIC      1
#define HS_ROLE_OVERLAY  2
#define HS_ROLE_UNDERLAY 3
#define HS_ROLE_POD      4
#define HS_ROLE_NIC_UNDERLAY 5  /* one NIC for the public side and VXLAN (Hetzner without vSwitch) */

/* why a packet event was sent (hs_event.why) */
#define HS_WHY_CONTROL   1  /* SYN, FIN or RST */
#define HS_WHY_HS_ACK    2  /* the ACK that completes a handshake seen at the nic */
#define HS_WHY_START     3  /* the segment starts an HTTP message */
#define HS_WHY_FOLLOW    4  /* a segment after a start whose headers did not end in it */

/* counters (index into the per-CPU stats array) */
#define HS_STAT_TC_SEEN       0
#define HS_STAT_TC_SENT       1
#define HS_STAT_TC_LOST       2
#define HS_STAT_KERNEL_SENT   3
#define HS_STAT_KERNEL_LOST   4
#define HS_STAT_DROP_SENT     5
#define HS_STAT_DROP_LOST     6
#define HS_STAT_STATE_SENT    7
#define HS_STAT_STATE_LOST    8
#define HS_STAT_PROXY_WRITES  9
#define HS_STAT_TC_IPV6      10
#define HS_STAT_FLOOD_SENT   11
#define HS_STAT_FLOOD_LOST   12
#define HS_STAT_NF_SENT      13
#define HS_STAT_NF_LOST      14
#define HS_STAT_IPVS_SENT    15
#define HS_STAT_IPVS_LOST    16
#define HS_STAT_MAX          17

/* verdicts of nf_hook_slow (hs_event.reason of HS_EV_NF) */
#define HS_NF_ACCEPT 1  /* returned 1: the packet goes on */
#define HS_NF_QUEUED 2  /* returned 0: stolen or queued (NFQUEUE), reinjected later */
#define HS_NF_DROP   3  /* returned < 0: dropped */

/* hs_event.vni of a packet that is not VXLAN-encapsulated */
#define HS_NO_VNI 0xffffffff

/* the payload an event can carry: at most HS_PAYLOAD_MAX - 1 bytes (a power of two: the
 * programs bound lengths with a mask, which every kernel's verifier follows) */
#ifndef HS_PAYLOAD_MAX
#define HS_PAYLOAD_MAX 2048
#endif

struct hs_event {
    __u64 ts_mono_ns;  /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u64 aux_ns;      /* PKT: when the proxy entered the write that sent it (0: none);
                          DROP: the kernel address that dropped it;
                          NF: how long the INPUT hook took (ns) */
    __u32 netns;       /* network namespace inode */
    __u32 ifindex;
    __u32 seq;
    __u32 ack;
    __u32 plen;        /* TCP payload length (from the IP header) */
    __u32 vni;         /* VXLAN network identifier, HS_NO_VNI when not encapsulated */
    __u32 saddr;       /* inner IPv4 addresses, network byte order */
    __u32 daddr;
    __u32 osaddr;      /* outer addresses of a VXLAN packet, else 0; IPVS: the real server */
    __u32 odaddr;
    __u16 sport;       /* host byte order */
    __u16 dport;
    __u16 ip_id;
    __u16 reason;      /* DROP: enum skb_drop_reason; STATE: old << 8 | new; NF: HS_NF_*;
                          IPVS: the real server's port */
    __u16 caplen;      /* payload bytes that follow the header */
    __u8 kind;
    __u8 dir;
    __u8 tcp_flags;
    __u8 proto;
    __u8 why;
    __u8 pad;
    __u8 payload[HS_PAYLOAD_MAX];
};

#define HS_EVENT_HDR ((int)__builtin_offsetof(struct hs_event, payload))

/* the proxy's processes: their tgids (0: a free slot), the one value of the proxy_set
 * array, written by the agent (agent/bpfprog.py proxy_set_value) */
#ifndef HS_MAX_PROXY
#define HS_MAX_PROXY 16
#endif
struct hs_proxy_set {
    __u32 tgid[HS_MAX_PROXY];
};

#endif
