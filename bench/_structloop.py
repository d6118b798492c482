"""The floor: a plain `struct` loop over a pcapng that only unpacks each packet's
Ethernet/IPv4/TCP fields (what the shared notes call "the plain struct parse").

    python bench/_structloop.py FILE      prints the packet count
"""

from __future__ import annotations

import struct
import sys


def main(path: str) -> int:
    hdr = struct.Struct("<IIIIII")
    iptcp = struct.Struct(">2xHHH1xB2x4s4sHHIIBB")
    n = 0
    with open(path, "rb") as f:
        data = f.read(1 << 20)
        pos = 0
        while True:
            end_data = len(data)
            while pos + 28 <= end_data:
                btype, blen, _ifid, _hi, _lo, cap = hdr.unpack_from(data, pos)
                if pos + blen > end_data:
                    break
                if btype == 6:
                    n += 1
                    s = pos + 28
                    if cap >= 54 and data[s + 12] == 8 and data[s + 13] == 0:
                        iptcp.unpack_from(data, s + 14)
                pos += blen
            chunk = f.read(1 << 20)
            if not chunk:
                break
            data = data[pos:] + chunk
            pos = 0
    print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
