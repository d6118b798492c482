/* hopscope: the ring-buffer flood test's program (tests/test_agent_bpf.py).
 * On each getpid() of the test's own process it emits HS_FLOOD_BURST events,
 * counting each as sent or lost, so that generated = delivered + lost can be
 * checked exactly. */
#include "maps.h"

TRACEPOINT_PROBE(syscalls, sys_enter_getpid)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tgid != HS_FLOOD_TGID)
        return 0;
    struct hs_event *e = hs_event_new(HS_SCRATCH_TRACE, HS_EV_PKT, HS_DIR_IN, 0);
    if (!e)
        return 0;
    for (int i = 0; i < HS_FLOOD_BURST; i++) {
        e->ts_mono_ns = bpf_ktime_get_ns();
        e->seq = i;
        hs_submit(e, 0, HS_STAT_FLOOD_SENT, HS_STAT_FLOOD_LOST);
    }
    return 0;
}
