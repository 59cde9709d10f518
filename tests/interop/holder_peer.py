#!/usr/bin/env python3
"""A client of `handover hold` in plain Python, written from
docs/protocol.md section 17 (requests and replies) on top of the channel
framing of peer.py (sections 2-10). Standard library only.

Driven by crates/handover-cli/tests/holder.rs:

    python3 tests/interop/holder_peer.py SOCKET_PATH TCP_PORT

The test has stored "rust/listener", a TCP socket listening on 127.0.0.1
TCP_PORT. From this side:

 1. store a pipe's reading end as "py/pipe" with a TTL, and /dev/null as
    "py/kept"; each reply describes the entry (kind, owner);
 2. list: both are there;
 3. retrieve "rust/listener": the handle comes back named, and the OS says
    it is a listening TCP socket on TCP_PORT;
 4. retrieve "py/pipe" with remove: read what was written into the pipe;
 5. errors: an unknown op, a store without its handle, a missing name,
    a bad name: each answered with its code;
 6. close; exit 0 ("holder_peer.py: all good"), or 1 with the reason.
"""

import json
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer  # noqa: E402  (the channel framing)


def call(sender, receiver, request, handles=()):
    """Sends one request (section 17.1) and returns (reply, [(fd, name)])."""
    sender.send(json.dumps(request).encode("utf-8"), list(handles))
    msg = receiver.recv_message()
    if msg is None:
        raise peer.ProtocolError("the holder closed the connection instead of answering")
    reply = json.loads(msg.payload.decode("utf-8"))
    if not isinstance(reply, dict) or "ok" not in reply:
        msg.close()
        raise peer.ProtocolError("not a reply: %r" % (reply,))
    return reply, [(fd, rec.name) for fd, rec in msg.handles]


def expect(cond, what):
    if not cond:
        raise peer.ProtocolError(what)


def expect_error(reply, code):
    expect(reply.get("ok") is False, "expected an error, got %r" % (reply,))
    expect(reply.get("error") == code, "expected %s, got %r" % (code, reply))
    expect(isinstance(reply.get("message"), str) and reply["message"], "an error says why")


def run(path, port):
    sock = peer.connect(path)
    sender, receiver = peer.Sender(sock), peer.Receiver(sock)

    # 1. store
    r, w = os.pipe()
    os.write(w, b"from python")
    os.close(w)
    pipe_kind = peer.Kind(peer.KIND_PIPE)
    reply, _ = call(
        sender,
        receiver,
        {"op": "store", "name": "py/pipe", "ttl_ms": 600000},
        [peer.Outgoing(r, "py/pipe", pipe_kind)],
    )
    os.close(r)
    expect(reply.get("ok") is True, "store: %r" % (reply,))
    entry = reply["entry"]
    expect(entry["name"] == "py/pipe" and entry["kind"] == "pipe", "store: %r" % (entry,))
    expect(entry["owner_uid"] == os.getuid(), "the owner is us: %r" % (entry,))
    expect(entry["expires_unix_ms"] - entry["stored_unix_ms"] == 600000, "the TTL: %r" % (entry,))
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    reply, _ = call(
        sender,
        receiver,
        {"op": "store", "name": "py/kept"},
        [peer.Outgoing(null, None, peer.Kind(peer.KIND_CHAR_DEVICE))],
    )
    os.close(null)
    expect(reply.get("ok") is True and reply["entry"]["kind"] == "char-device", "store: %r" % (reply,))

    # 2. list
    reply, _ = call(sender, receiver, {"op": "list"})
    names = [e["name"] for e in reply["entries"]]
    expect(names == ["py/kept", "py/pipe", "rust/listener"], "list: %r" % (names,))

    # 3. retrieve a duplicate of the listener the Rust side stored
    reply, handles = call(sender, receiver, {"op": "retrieve", "names": ["rust/listener"]})
    expect(reply.get("ok") is True and len(handles) == 1, "retrieve: %r" % (reply,))
    fd, name = handles[0]
    expect(name == "rust/listener", "the handle is named: %r" % (name,))
    s = socket.socket(fileno=fd)
    expect(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1, "a listening socket")
    expect(s.type == socket.SOCK_STREAM and s.getsockname()[1] == port, "on port %d" % port)
    s.close()

    # 4. take the pipe out and read it
    reply, handles = call(sender, receiver, {"op": "retrieve", "names": ["py/pipe"], "remove": True})
    expect(len(handles) == 1, "one handle")
    got = os.read(handles[0][0], 100)
    os.close(handles[0][0])
    expect(got == b"from python", "read %r" % (got,))

    # 5. errors
    reply, _ = call(sender, receiver, {"op": "frobnicate"})
    expect_error(reply, "unknown-op")
    reply, _ = call(sender, receiver, {"op": "store", "name": "x"})
    expect_error(reply, "malformed")
    reply, _ = call(sender, receiver, {"op": "retrieve", "names": ["py/pipe"]})
    expect_error(reply, "not-found")
    reply, _ = call(sender, receiver, {"op": "remove", "name": "a:b"})
    expect_error(reply, "bad-name")

    sock.close()


def main(argv):
    if len(argv) != 3:
        print("usage: holder_peer.py SOCKET_PATH TCP_PORT", file=sys.stderr)
        return 2
    try:
        run(argv[1], int(argv[2]))
    except (peer.ProtocolError, OSError, ValueError, KeyError, TypeError) as e:
        print("holder_peer.py: FAIL: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 1
    print("holder_peer.py: all good", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
