"""Build observation streams of requests on the modelled path, with exact timings.

Used by the stitcher's unit tests: no files, no scapy, every moment chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hopscope.model import ACK, FIN, PSH, SYN, Observation, make_packet

T0 = 1_795_766_400_000_000_000

CLIENT = "162.158.90.17"
NODE_IP = {"node1": "178.104.247.152", "node2": "178.105.32.198", "node3": "178.104.249.189"}
FLANNEL = {"node1": "10.42.0.0", "node2": "10.42.1.0", "node3": "10.42.2.0"}
POD_IP = {"node1": "10.42.0.5", "node2": "10.42.1.5", "node3": "10.42.2.5"}


def http_request(method: str, path: str, ray: str | None, extra: str = "", body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: api.myhoneydue.com"]
    if ray:
        lines.append(f"CF-Ray: {ray}")
    lines += ["CF-Connecting-IP: 198.51.100.77", "X-Forwarded-Proto: https",
              f"Content-Length: {len(body)}"]
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def http_response(status: int, body: bytes = b'{"id": 1}', chunked: bool = False) -> bytes:
    reason = {200: "OK", 201: "Created", 502: "Bad Gateway", 504: "Gateway Timeout"}.get(status, "X")
    if chunked:
        half = len(body) // 2
        enc = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, body[:half], len(body) - half, body[half:])
        return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Transfer-Encoding: chunked\r\n\r\n").encode() + enc
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@dataclass
class Timeline:
    """Observations per node, added in any order, returned sorted by time."""

    obs: dict[str, list[Observation]] = field(default_factory=dict)
    ipid: int = 1000

    def add(self, node: str, ifname: str, t: int, src: str, sport: int, dst: str, dport: int,
            seq: int, ack: int, flags: int, payload: bytes = b"", vxlan: tuple[str, str] | None = None,
            ip_id: int | None = None) -> int:
        if ip_id is None:
            self.ipid += 1
            ip_id = self.ipid
        ob = make_packet(T0 + t, node, ifname, src, sport, dst, dport, seq=seq, ack=ack, flags=flags,
                         payload=payload, ip_id=ip_id,
                         vni=1 if vxlan else -1,
                         outer_src=vxlan[0] if vxlan else b"", outer_dst=vxlan[1] if vxlan else b"")
        self.obs.setdefault(node, []).append(ob)
        return ip_id

    def sorted(self, node: str) -> list[Observation]:
        return sorted(self.obs.get(node, []), key=lambda o: o.ts_real_ns)


@dataclass
class Seg:
    """One segment crossing the upstream path, at every point, with its own times."""

    times: dict[str, int]  # point key -> time (ns after T0)


def upstream_segment(tl: Timeline, a: str, b: str, times: dict[str, int], src: str, sport: int,
                     dst: str, dport: int, seq: int, ack: int, flags: int, payload: bytes = b"",
                     reverse: bool = False, skip: frozenset[str] = frozenset()) -> None:
    """One upstream segment at each point whose time is given.

    Keys of ``times``: ``a_ov``, ``a_ul``, ``b_ul``, ``b_ov``, ``b_cni``, ``b_veth`` (for a
    request; a response goes the other way and uses the same keys). ``a`` sends requests.
    """
    ipid = tl.ipid + 1
    tl.ipid += 1
    outer = (NODE_IP[a], NODE_IP[b]) if not reverse else (NODE_IP[b], NODE_IP[a])
    places = {
        "a_ov": (a, "flannel.1", None), "a_ul": (a, "eth0", outer),
        "b_ul": (b, "eth0", outer), "b_ov": (b, "flannel.1", None),
        "b_cni": (b, "cni0", None), "b_veth": (b, "vethab12cd34", None),
    }
    for key, t in times.items():
        if key in skip:
            continue
        node, ifname, vx = places[key]
        tl.add(node, ifname, t, src, sport, dst, dport, seq, ack, flags, payload, vxlan=vx, ip_id=ipid)


def cross_node_request(tl: Timeline, *, a: str = "node1", b: str = "node2", t: int = 0,
                       ray: str | None = "8c1f2e3d4b5a6978-DFW", cport: int = 40123,
                       uport: int = 51000, skew_b: int = 0, status: int = 201,
                       lose_upstream_first: bool = False, split_upstream: int = 0) -> dict[str, int]:
    """A new client connection, a new upstream connection, one POST; returns the true hops.

    ``split_upstream``: the upstream request in two segments, cut inside its head (so that
    the second completes the head: the request's "complete"), the second that many ns after
    the first at every point."""
    c_isn, s_isn, u_isn, p_isn = 1000, 900000, 5000, 7000000
    nic_ip = NODE_IP[a]
    # client handshake at the nic
    tl.add(a, "eth0", t + 0, CLIENT, cport, nic_ip, 80, c_isn, 0, SYN)
    tl.add(a, "eth0", t + 20_000, nic_ip, 80, CLIENT, cport, s_isn, c_isn + 1, SYN | ACK)
    tl.add(a, "eth0", t + 120_000, CLIENT, cport, nic_ip, 80, c_isn + 1, s_isn + 1, ACK)
    req = http_request("POST", "/api/tasks/", ray, body=b'{"title": "fix the sink"}')
    t_req = t + 200_000
    tl.add(a, "eth0", t_req, CLIENT, cport, nic_ip, 80, c_isn + 1, s_isn + 1, ACK | PSH, req)
    tl.add(a, "eth0", t_req + 40_000, nic_ip, 80, CLIENT, cport, s_isn + 1, c_isn + 1 + len(req), ACK)
    # upstream handshake (Traefik -> ClusterIP, DNATed to the pod, masqueraded)
    src, dst = FLANNEL[a], POD_IP[b]
    hs = {"a_ov": t_req + 300_000, "a_ul": t_req + 330_000, "b_ul": t_req + 345_000 + skew_b,
          "b_ov": t_req + 365_000 + skew_b, "b_cni": t_req + 375_000 + skew_b,
          "b_veth": t_req + 380_000 + skew_b}
    upstream_segment(tl, a, b, hs, src, uport, dst, 8000, u_isn, 0, SYN)
    back = {"b_veth": t_req + 400_000 + skew_b, "b_cni": t_req + 405_000 + skew_b,
            "b_ov": t_req + 415_000 + skew_b, "b_ul": t_req + 445_000 + skew_b,
            "a_ul": t_req + 460_000, "a_ov": t_req + 480_000}
    upstream_segment(tl, a, b, back, dst, 8000, src, uport, p_isn, u_isn + 1, SYN | ACK, reverse=True)
    ack = {"a_ov": t_req + 500_000, "a_ul": t_req + 530_000, "b_ul": t_req + 545_000 + skew_b,
           "b_ov": t_req + 565_000 + skew_b, "b_cni": t_req + 575_000 + skew_b,
           "b_veth": t_req + 580_000 + skew_b}
    upstream_segment(tl, a, b, ack, src, uport, dst, 8000, u_isn + 1, p_isn + 1, ACK)
    ureq = http_request("POST", "/api/tasks/", ray, extra="X-Forwarded-Server: " + a,
                        body=b'{"title": "fix the sink"}')
    t_u = t_req + 510_000
    times = {"a_ov": t_u, "a_ul": t_u + 35_000, "b_ul": t_u + 50_000 + skew_b,
             "b_ov": t_u + 70_000 + skew_b, "b_cni": t_u + 80_000 + skew_b,
             "b_veth": t_u + 85_000 + skew_b}
    skip = frozenset({"b_ul", "b_ov", "b_cni", "b_veth"}) if lose_upstream_first else frozenset()
    if split_upstream:
        cut = ureq.index(b"\r\n") + 2  # after the request line
        upstream_segment(tl, a, b, times, src, uport, dst, 8000, u_isn + 1, p_isn + 1, ACK, ureq[:cut],
                         skip=skip)
        later = {k: v + split_upstream for k, v in times.items()}
        upstream_segment(tl, a, b, later, src, uport, dst, 8000, u_isn + 1 + cut, p_isn + 1, ACK | PSH,
                         ureq[cut:], skip=skip)
    else:
        upstream_segment(tl, a, b, times, src, uport, dst, 8000, u_isn + 1, p_isn + 1, ACK | PSH, ureq,
                         skip=skip)
    retrans = 0
    if lose_upstream_first:
        retrans = 204_000_000
        rt = {k: v + retrans for k, v in times.items()}
        upstream_segment(tl, a, b, rt, src, uport, dst, 8000, u_isn + 1, p_isn + 1, ACK | PSH, ureq)
    app = 2_000_000
    resp = http_response(status)
    t_p = t_u + 85_000 + split_upstream + retrans + app + skew_b  # response leaves the pod (veth in)
    rtimes = {"b_veth": t_p, "b_cni": t_p + 5_000, "b_ov": t_p + 15_000, "b_ul": t_p + 45_000,
              "a_ul": t_p - skew_b + 60_000, "a_ov": t_p - skew_b + 80_000}
    upstream_segment(tl, a, b, rtimes, dst, 8000, src, uport, p_isn + 1, u_isn + 1 + len(ureq),
                     ACK | PSH, resp, reverse=True)
    t_out = t_p - skew_b + 80_000 + 150_000
    cresp = http_response(status)
    tl.add(a, "eth0", t_out, nic_ip, 80, CLIENT, cport, s_isn + 1, c_isn + 1 + len(req), ACK | PSH, cresp)
    tl.add(a, "eth0", t_out + 90_000, CLIENT, cport, nic_ip, 80, c_isn + 1 + len(req),
           s_isn + 1 + len(cresp), ACK | FIN)
    # the truth, in a's clock
    return {
        "ingress": t_u - t_req,
        "encap_req": 35_000,
        "wire_req": 15_000 + retrans,
        "decap_req": 20_000,
        # overlay in (the first byte) -> cni0 (the first pod copy of the head's last byte)
        "deliver": 10_000 + split_upstream,
        "app": (t_p - skew_b) - (t_u + 80_000 + split_upstream + retrans),
        "route": 15_000,
        "encap_resp": 30_000,
        "wire_resp": 15_000,
        "decap_resp": 20_000,
        "egress": 150_000,
        "total": t_out - t_req,
        "edge_rtt": 100_000,
        "start": T0 + t_req,
    }


__all__ = ["ACK", "FIN", "PSH", "SYN", "Timeline", "cross_node_request", "http_request",
           "http_response"]
