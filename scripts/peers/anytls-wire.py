#!/usr/bin/env python3
"""Wire-level probes for AnyTLS peers (stdlib only).

capture-server: a TLS server (our test cert) that plays a minimal AnyTLS v1 or v2 server and
    logs, per TLS connection, the plaintext size of every TLS record the client sends, the
    authentication block, and every frame (Settings contents, SYN ids, destination address).
    Each stream gets a canned HTTP answer, so `curl` through the client completes and a
    second request shows whether the client reuses the session.

        anytls-wire.py capture-server --port P --cert C --key K --password PW
                                      [--v2] [--seconds 20] [--log FILE]

probe-client: connects to an AnyTLS server, sends auth + Settings + SYN + destination +
    an HTTP GET, and logs every frame the server sends back (ServerSettings,
    UpdatePaddingScheme, SYNACK, PSH, FIN, Alert).

        anytls-wire.py probe-client --port P --password PW --target-port T
                                    [--v 2] [--padding-md5 HEX] [--streams 2]

Output is one JSON object per line (event log), so tests can grep it.
"""
import argparse
import hashlib
import json
import socket
import ssl
import struct
import sys
import threading
import time

CMD = {0: "Waste", 1: "SYN", 2: "PSH", 3: "FIN", 4: "Settings", 5: "Alert",
       6: "UpdatePaddingScheme", 7: "SYNACK", 8: "HeartRequest", 9: "HeartResponse",
       10: "ServerSettings"}

DEFAULT_SCHEME = (b"stop=8\n0=30-30\n1=100-400\n"
                  b"2=400-500,c,500-1000,c,500-1000,c,500-1000,c,500-1000\n"
                  b"3=9-9,500-1000\n4=500-1000\n5=500-1000\n6=500-1000\n7=500-1000")

_out_lock = threading.Lock()
_log_file = None


def emit(**kw):
    kw.setdefault("t", round(time.time(), 3))
    line = json.dumps(kw, sort_keys=False)
    with _out_lock:
        print(line, flush=True)
        if _log_file:
            _log_file.write(line + "\n")
            _log_file.flush()


def frame(cmd, sid, data=b""):
    return struct.pack(">BIH", cmd, sid, len(data)) + data


def parse_addr(buf):
    """SOCKS5 address + port at the start of buf -> (host, port, consumed) or None."""
    if not buf:
        return None
    t = buf[0]
    if t == 1 and len(buf) >= 7:
        return socket.inet_ntoa(buf[1:5]), struct.unpack(">H", buf[5:7])[0], 7
    if t == 3 and len(buf) >= 2 and len(buf) >= 2 + buf[1] + 2:
        n = buf[1]
        return buf[2:2 + n].decode(errors="replace"), struct.unpack(">H", buf[2 + n:4 + n])[0], 4 + n
    if t == 4 and len(buf) >= 19:
        return socket.inet_ntop(socket.AF_INET6, buf[1:17]), struct.unpack(">H", buf[17:19])[0], 19
    return None


class FrameReader:
    def __init__(self):
        self.buf = b""

    def feed(self, data):
        self.buf += data
        out = []
        while len(self.buf) >= 7:
            cmd, sid, n = struct.unpack(">BIH", self.buf[:7])
            if len(self.buf) < 7 + n:
                break
            out.append((cmd, sid, self.buf[7:7 + n]))
            self.buf = self.buf[7 + n:]
        return out


# ---------------------------------------------------------------- capture server

def serve_conn(conn, peer, args, conn_no, sni_seen):
    want = hashlib.sha256(args.password.encode()).digest()
    conn.settimeout(args.idle)
    emit(ev="tls", conn=conn_no, peer=peer, version=conn.version(), cipher=conn.cipher()[0],
         alpn=conn.selected_alpn_protocol(), sni=sni_seen.get(id(conn)))
    rec_no = 0
    auth_done = False
    pending = b""
    fr = FrameReader()
    streams = {}  # sid -> bytes buffer before address parsed / state
    settings_seen = False
    try:
        while True:
            try:
                data = conn.recv(1 << 17)  # one SSL_read returns at most one TLS record
            except socket.timeout:
                emit(ev="idle-timeout", conn=conn_no)
                break
            if not data:
                emit(ev="eof", conn=conn_no)
                break
            emit(ev="record", conn=conn_no, n=rec_no, len=len(data),
                 head=data[:48].hex() if rec_no == 0 else None)
            rec_no += 1
            if not auth_done:
                pending += data
                if len(pending) < 34:
                    emit(ev="auth-short", conn=conn_no, have=len(pending))
                    continue
                pad_len = struct.unpack(">H", pending[32:34])[0]
                if len(pending) < 34 + pad_len:
                    emit(ev="auth-split", conn=conn_no, have=len(pending), need=34 + pad_len)
                    continue
                ok = pending[:32] == want
                emit(ev="auth", conn=conn_no, ok=ok, padding0_len=pad_len,
                     auth_block_len=34 + pad_len, record0_len=len(data),
                     extra_in_same_record=len(pending) - 34 - pad_len,
                     padding_all_zero=pending[34:34 + pad_len] == bytes(pad_len))
                if not ok:
                    break
                auth_done = True
                data = pending[34 + pad_len:]
                pending = b""
            for cmd, sid, payload in fr.feed(data):
                name = CMD.get(cmd, "cmd%d" % cmd)
                ev = dict(ev="frame", conn=conn_no, cmd=name, sid=sid, len=len(payload))
                if cmd in (4, 5, 6, 10):
                    ev["text"] = payload.decode(errors="replace")
                elif cmd == 2 and sid in streams and streams[sid].get("addr") is None:
                    pass
                emit(**ev)
                if cmd == 4:
                    settings_seen = True
                    kv = dict(l.split("=", 1) for l in payload.decode(errors="replace").split("\n") if "=" in l)
                    emit(ev="settings", conn=conn_no, keys=kv)
                    if args.v2 and int(kv.get("v", "1") or 1) >= 2:
                        conn.sendall(frame(10, 0, b"v=2"))
                    if kv.get("padding-md5") != hashlib.md5(DEFAULT_SCHEME).hexdigest():
                        emit(ev="note", conn=conn_no, msg="client padding-md5 differs from default scheme md5")
                elif cmd == 1:
                    if not settings_seen:
                        emit(ev="note", conn=conn_no, msg="SYN before Settings")
                    streams[sid] = {"buf": b"", "addr": None}
                elif cmd == 2 and sid in streams:
                    st = streams[sid]
                    if st["addr"] is None:
                        st["buf"] += payload
                        a = parse_addr(st["buf"])
                        if a:
                            st["addr"] = a[:2]
                            rest = st["buf"][a[2]:]
                            emit(ev="dest", conn=conn_no, sid=sid, host=a[0], port=a[1],
                                 addr_frame_len=len(payload), payload_in_same_frame=len(rest))
                            if args.v2:
                                conn.sendall(frame(7, sid))
                            st["buf"] = rest
                    else:
                        st["buf"] += payload
                    if st["addr"] is not None and b"\r\n\r\n" in st["buf"] and not st.get("answered"):
                        st["answered"] = True
                        body = b"captured by anytls-wire\n"
                        resp = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                                % len(body)) + body
                        conn.sendall(frame(2, sid, resp) + frame(3, sid))
                elif cmd == 8:
                    conn.sendall(frame(9, sid))
    except (OSError, ssl.SSLError) as e:
        emit(ev="error", conn=conn_no, err=repr(e))
    finally:
        try:
            conn.close()
        except OSError:
            pass


def capture_server(args):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    sni_seen = {}

    def sni_cb(sslobj, name, _ctx):
        sni_seen["last"] = name

    ctx.sni_callback = sni_cb
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", args.port))
    ls.listen(16)
    ls.settimeout(0.5)
    emit(ev="listening", port=args.port, v2=args.v2)
    deadline = time.time() + args.seconds
    n = 0
    threads = []
    while time.time() < deadline:
        try:
            raw, peer = ls.accept()
        except socket.timeout:
            continue
        n += 1
        raw.settimeout(10)
        try:
            conn = ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as e:
            emit(ev="tls-error", conn=n, err=repr(e))
            raw.close()
            continue
        sni_seen[id(conn)] = sni_seen.pop("last", None)
        t = threading.Thread(target=serve_conn, args=(conn, "%s:%d" % peer, args, n, sni_seen),
                             daemon=True)
        t.start()
        threads.append(t)
    ls.close()
    emit(ev="done", connections=n)


# ---------------------------------------------------------------- probe client

def probe_client(args):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", args.port), timeout=args.timeout)
    conn = ctx.wrap_socket(raw, server_hostname=args.sni)
    emit(ev="tls", version=conn.version(), cipher=conn.cipher()[0])
    auth = hashlib.sha256(args.password.encode()).digest() + struct.pack(">H", 30) + bytes(30)
    conn.sendall(auth)
    settings = "v=%s\nclient=anytls-wire/0.1\npadding-md5=%s" % (args.v, args.padding_md5)
    fr = FrameReader()
    conn.settimeout(args.timeout)

    def read_frames(until, seconds):
        end = time.time() + seconds
        got = []
        while time.time() < end:
            try:
                data = conn.recv(1 << 17)
            except socket.timeout:
                break
            if not data:
                emit(ev="eof")
                got.append(None)
                break
            for cmd, sid, payload in fr.feed(data):
                name = CMD.get(cmd, "cmd%d" % cmd)
                ev = dict(ev="frame", cmd=name, sid=sid, len=len(payload))
                if cmd in (5, 6, 7, 10):
                    ev["text"] = payload.decode(errors="replace")
                elif cmd == 2:
                    ev["head"] = payload[:40].decode(errors="replace")
                emit(**ev)
                got.append((cmd, sid, payload))
                if cmd == 8:
                    conn.sendall(frame(9, sid))
            if any(g is not None and until(g) for g in got):
                break
        return got

    for sid in range(1, args.streams + 1):
        dest = b"\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", args.target_port)
        req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        first = frame(4, 0, settings.encode()) if sid == 1 else b""
        t0 = time.time()
        conn.sendall(first + frame(1, sid) + frame(2, sid, dest))
        conn.sendall(frame(2, sid, req))
        got = read_frames(lambda g: g[0] == 3 and g[1] == sid, args.timeout)
        if None in got:
            break
        if args.fin:
            conn.sendall(frame(3, sid))
        syn = [g for g in got if g and g[0] == 7 and g[1] == sid]
        emit(ev="stream-summary", sid=sid, synack=bool(syn),
             synack_ms=None, elapsed_ms=round((time.time() - t0) * 1000),
             fin=any(g and g[0] == 3 and g[1] == sid for g in got),
             body=b"".join(g[2] for g in got if g and g[0] == 2 and g[1] == sid)[-60:].decode(errors="replace"))
    conn.close()


def main():
    global _log_file
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("capture-server")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--cert", required=True)
    c.add_argument("--key", required=True)
    c.add_argument("--password", required=True)
    c.add_argument("--v2", action="store_true", help="answer ServerSettings v=2 and SYNACK")
    c.add_argument("--seconds", type=float, default=20, help="stop accepting after this")
    c.add_argument("--idle", type=float, default=8, help="close a connection idle this long")
    c.add_argument("--log")
    p = sub.add_parser("probe-client")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--target-port", type=int, required=True)
    p.add_argument("--sni", default="localhost")
    p.add_argument("--v", default="2")
    p.add_argument("--padding-md5", default="00000000000000000000000000000000")
    p.add_argument("--streams", type=int, default=2)
    p.add_argument("--timeout", type=float, default=5)
    p.add_argument("--fin", action="store_true",
                   help="send FIN for each stream after the server's FIN (the reference does not)")
    p.add_argument("--log")
    args = ap.parse_args()
    if args.log:
        _log_file = open(args.log, "a")
    if args.mode == "capture-server":
        capture_server(args)
    else:
        probe_client(args)


if __name__ == "__main__":
    main()
