#!/usr/bin/env python3
"""A handover channel peer in plain Python, written from docs/protocol.md.

Standard library only (socket, struct, os). It is driven by
crates/handover/tests/python_interop.rs, which binds a ChannelListener and
runs:

    python3 tests/interop/peer.py PATH

PATH is the listener's socket path, or @NAME for a Linux abstract name.
The conversation, from this side:

 1. connect (AF_UNIX, SOCK_SEQPACKET);
 2. send a message whose payload is the decimal port of a TCP socket
    listening on 127.0.0.1, with that listening socket attached under the
    name "from-python" (then close our own copy: the Rust side owns it now);
 3. receive a message with payload "write your lines" and two sockets:
    "unix-end" (a connected Unix stream socket) and "tcp-conn" (a
    connected TCP socket, accepted by the Rust side through the listener of
    step 2). Check what they are declared as, check with the OS what they
    really are, and write a known line into each;
 4. receive a message split over several frames: a 150000-byte payload
    (byte i is i % 251) and 300 handles named "null-0" ... "null-299", all
    /dev/null. Check every frame and every handle, close them all;
 5. reply with a handle-less message "ok frames=N handles=300 bytes=150000";
 6. expect a clean end of stream, and exit 0.

Anything that does not match the protocol or the script is fatal: every
descriptor received for the broken message is closed, a message saying
what was wrong goes to stderr, and the exit status is 1.

Note: socket.send_fds()/socket.recv_fds() would do for the descriptors, but
they silently ignore their `flags` argument (CPython issue gh-107898), and
the protocol wants MSG_NOSIGNAL on send and MSG_CMSG_CLOEXEC on receive
(docs/protocol.md section 2). So this uses sock.sendmsg()/sock.recvmsg()
with SCM_RIGHTS directly, which is all those helpers do.
"""

import array
import os
import socket
import stat
import struct
import sys

# ---------------------------------------------------------------------------
# Constants (docs/protocol.md sections 4, 5, 6, 7, 8)

MAGIC = b"HNDV"
VERSION = 1
FRAME_MESSAGE = 1

FLAG_FIRST = 0x0001
FLAG_LAST = 0x0002
KNOWN_FLAGS = FLAG_FIRST | FLAG_LAST

HEADER_LEN = 28
RECORD_LEN = 16
MAX_FRAME_LEN = 65536
MAX_FRAME_HANDLES = 253
MAX_NAME_LEN = 255
MAX_EXTRA_LEN = 1024

# Header: magic, version, frame_type, flags, seq, total_handles, total_bytes,
# frame_handles, frame_bytes. All little-endian, no padding.
HEADER = struct.Struct("<4sBBHIIIII")
# Record: kind, family, socket_type, record_flags, name_len, extra_len,
# value, reserved.
RECORD = struct.Struct("<BBBBHHII")
assert HEADER.size == HEADER_LEN and RECORD.size == RECORD_LEN

KIND_OTHER = 0
KIND_SOCKET = 1
KIND_FILE = 2
KIND_PIPE = 3
KIND_SHARED_MEMORY = 4
KIND_DIRECTORY = 5
KIND_CHAR_DEVICE = 6
KIND_NAMES = {
    KIND_OTHER: "other",
    KIND_SOCKET: "socket",
    KIND_FILE: "file",
    KIND_PIPE: "pipe",
    KIND_SHARED_MEMORY: "shared memory",
    KIND_DIRECTORY: "directory",
    KIND_CHAR_DEVICE: "character device",
}

FAMILY_OTHER = 0
FAMILY_UNIX = 1
FAMILY_IPV4 = 2
FAMILY_IPV6 = 3
FAMILY_NAMES = {0: "other", 1: "unix", 2: "ipv4", 3: "ipv6"}

TYPE_OTHER = 0
TYPE_STREAM = 1
TYPE_DATAGRAM = 2
TYPE_SEQPACKET = 3
TYPE_NAMES = {0: "other", 1: "stream", 2: "datagram", 3: "seqpacket"}

RECORD_FLAG_LISTENING = 0x01

# The receiver's own message limits (section 8); these are the reference's
# defaults.
MAX_MESSAGE_HANDLES = 4096
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# Section 2: room for 253 descriptors, plus one spare like the reference.
CONTROL_LEN = socket.CMSG_SPACE((MAX_FRAME_HANDLES + 1) * array.array("i").itemsize)

# No single step of the conversation may take longer than this.
TIMEOUT = 30.0

# The worked example of docs/protocol.md section 13, copied from there.
WORKED_EXAMPLE = bytes.fromhex(
    "48 4e 44 56 01 01 03 00 00 00 00 00 01 00 00 00"
    "02 00 00 00 01 00 00 00 02 00 00 00 01 02 01 01"
    "04 00 00 00 00 00 00 00 00 00 00 00 68 74 74 70"
    "68 69"
)
WORKED_EMPTY = bytes.fromhex(
    "48 4e 44 56 01 01 03 00 01 00 00 00 00 00 00 00"
    "00 00 00 00 00 00 00 00 00 00 00 00"
)


class ProtocolError(Exception):
    """The peer broke docs/protocol.md, or the conversation went off script."""


# ---------------------------------------------------------------------------
# Kinds (sections 6, 7, 11)


class Kind:
    """A record's kind, family, socket_type and LISTENING flag."""

    def __init__(self, kind, family=FAMILY_OTHER, socket_type=TYPE_OTHER, listening=False):
        self.kind = kind
        self.family = family
        self.socket_type = socket_type
        self.listening = listening

    def wire(self):
        if self.kind != KIND_SOCKET:
            return (self.kind, 0, 0, 0)
        flags = RECORD_FLAG_LISTENING if self.listening else 0
        return (self.kind, self.family, self.socket_type, flags)

    def __eq__(self, other):
        return isinstance(other, Kind) and self.wire() == other.wire()

    def __repr__(self):
        if self.kind != KIND_SOCKET:
            return KIND_NAMES.get(self.kind, "kind %d" % self.kind)
        return "%s%s %s socket" % (
            "listening " if self.listening else "",
            FAMILY_NAMES[self.family],
            TYPE_NAMES[self.socket_type],
        )


def socket_kind(family, socket_type, listening):
    return Kind(KIND_SOCKET, family, socket_type, listening)


def real_kind(fd):
    """What the OS says the descriptor is (section 11), as a Kind, plus the
    socket protocol (or None)."""
    st = os.fstat(fd)
    mode = st.st_mode
    if stat.S_ISSOCK(mode):
        s = socket.socket(fileno=fd)
        try:
            domain = s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
            stype = s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
            proto = s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
            family = {
                socket.AF_UNIX: FAMILY_UNIX,
                socket.AF_INET: FAMILY_IPV4,
                socket.AF_INET6: FAMILY_IPV6,
            }.get(domain, FAMILY_OTHER)
            socket_type = {
                socket.SOCK_STREAM: TYPE_STREAM,
                socket.SOCK_DGRAM: TYPE_DATAGRAM,
                socket.SOCK_SEQPACKET: TYPE_SEQPACKET,
            }.get(stype, TYPE_OTHER)
            listening = False
            if socket_type in (TYPE_STREAM, TYPE_SEQPACKET):
                listening = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 0
            return socket_kind(family, socket_type, listening), proto
        finally:
            s.detach()  # we only looked; the caller still owns fd
    if stat.S_ISREG(mode):
        return Kind(KIND_FILE), None
    if stat.S_ISFIFO(mode):
        return Kind(KIND_PIPE), None
    if stat.S_ISDIR(mode):
        return Kind(KIND_DIRECTORY), None
    if stat.S_ISCHR(mode):
        return Kind(KIND_CHAR_DEVICE), None
    return Kind(KIND_OTHER), None


# ---------------------------------------------------------------------------
# Encoding (sections 5, 6, 9)


def check_name(name):
    """Section 6: 1 to 255 bytes of UTF-8, no NUL. Returns the bytes."""
    raw = name.encode("utf-8")
    if not raw or len(raw) > MAX_NAME_LEN or b"\0" in raw:
        raise ValueError("handle name %r cannot be sent" % (name,))
    return raw


def encode_record(kind, name):
    raw_name = b"" if name is None else check_name(name)
    k, family, socket_type, flags = kind.wire()
    # On Linux value and extra_len are 0 (section 6).
    return RECORD.pack(k, family, socket_type, flags, len(raw_name), 0, 0, 0) + raw_name


def encode_header(flags, seq, total_handles, total_bytes, frame_handles, frame_bytes):
    return HEADER.pack(
        MAGIC, VERSION, FRAME_MESSAGE, flags, seq,
        total_handles, total_bytes, frame_handles, frame_bytes,
    )


def plan_frames(record_lens, nbytes):
    """Section 9: returns [((h0, h1), (b0, b1)), ...], one per frame."""
    n = len(record_lens)
    if n <= MAX_FRAME_HANDLES and HEADER_LEN + sum(record_lens) + nbytes <= MAX_FRAME_LEN:
        return [((0, n), (0, nbytes))]
    spans = []
    h = b = 0
    while True:
        room = MAX_FRAME_LEN - HEADER_LEN
        h0 = h
        while h < n and h - h0 < MAX_FRAME_HANDLES and record_lens[h] <= room:
            room -= record_lens[h]
            h += 1
        b0 = b
        b += min(room, nbytes - b)
        spans.append(((h0, h), (b0, b)))
        if h == n and b == nbytes:
            return spans


class Outgoing:
    """A handle to send: a descriptor we keep owning, its name and kind."""

    def __init__(self, fd, name, kind):
        self.fd = fd
        self.name = name
        self.kind = kind


class Sender:
    def __init__(self, sock):
        self.sock = sock
        self.seq = 0  # section 9, step 1

    def send(self, payload, handles):
        records = [encode_record(h.kind, h.name) for h in handles]
        spans = plan_frames([len(r) for r in records], len(payload))
        seq = self.seq
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        for i, ((h0, h1), (b0, b1)) in enumerate(spans):
            flags = 0
            if i == 0:
                flags |= FLAG_FIRST
            if i == len(spans) - 1:
                flags |= FLAG_LAST
            frame = (
                encode_header(flags, seq, len(handles), len(payload), h1 - h0, b1 - b0)
                + b"".join(records[h0:h1])
                + payload[b0:b1]
            )
            assert len(frame) <= MAX_FRAME_LEN
            fds = [h.fd for h in handles[h0:h1]]
            # Section 2: one sendmsg, one SCM_RIGHTS message in record order,
            # none at all without handles, MSG_NOSIGNAL.
            ancdata = []
            if fds:
                ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            sent = self.sock.sendmsg([frame], ancdata, socket.MSG_NOSIGNAL)
            if sent != len(frame):
                raise ProtocolError("sendmsg sent %d of %d bytes of a record" % (sent, len(frame)))


# ---------------------------------------------------------------------------
# Decoding (sections 5, 6, 7)


class Record:
    def __init__(self, kind, name, value, extra):
        self.kind = kind
        self.name = name
        self.value = value
        self.extra = extra


def decode_header(buf):
    if len(buf) < HEADER_LEN:
        raise ProtocolError("frame of %d bytes is shorter than the 28-byte header" % len(buf))
    magic, version, ftype, flags, seq, th, tb, fh, fb = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ProtocolError("bad magic %r" % (magic,))
    if version != VERSION:
        raise ProtocolError("unsupported version %d" % version)
    if ftype != FRAME_MESSAGE:
        raise ProtocolError("unknown frame type %d" % ftype)
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError("unknown flag bits %#06x" % flags)
    if fh > MAX_FRAME_HANDLES:
        raise ProtocolError("frame announces %d handles (limit %d)" % (fh, MAX_FRAME_HANDLES))
    return {
        "flags": flags,
        "seq": seq,
        "total_handles": th,
        "total_bytes": tb,
        "frame_handles": fh,
        "frame_bytes": fb,
    }


def decode_kind(index, kind, family, socket_type, flags):
    if kind not in KIND_NAMES:
        raise ProtocolError("record %d: unknown kind %d" % (index, kind))
    if kind != KIND_SOCKET:
        if family or socket_type or flags:
            raise ProtocolError("record %d: non-zero socket fields on a %s" % (index, KIND_NAMES[kind]))
        return Kind(kind)
    if family not in FAMILY_NAMES:
        raise ProtocolError("record %d: unknown family %d" % (index, family))
    if socket_type not in TYPE_NAMES:
        raise ProtocolError("record %d: unknown socket type %d" % (index, socket_type))
    if flags & ~RECORD_FLAG_LISTENING:
        raise ProtocolError("record %d: unknown record flag bits %#04x" % (index, flags))
    return socket_kind(family, socket_type, bool(flags & RECORD_FLAG_LISTENING))


def decode_frame(buf):
    """Decodes one whole frame strictly. Returns (header, records, payload)."""
    if len(buf) > MAX_FRAME_LEN:
        raise ProtocolError("frame of %d bytes exceeds %d" % (len(buf), MAX_FRAME_LEN))
    header = decode_header(buf)
    at = HEADER_LEN
    records = []
    for index in range(header["frame_handles"]):
        if len(buf) - at < RECORD_LEN:
            raise ProtocolError("record %d is cut off by the end of the frame" % index)
        kind, family, socket_type, rflags, name_len, extra_len, value, reserved = RECORD.unpack_from(buf, at)
        at += RECORD_LEN
        k = decode_kind(index, kind, family, socket_type, rflags)
        if reserved != 0:
            raise ProtocolError("record %d: reserved field is %#x, not 0" % (index, reserved))
        if name_len > MAX_NAME_LEN:
            raise ProtocolError("record %d: name of %d bytes (limit %d)" % (index, name_len, MAX_NAME_LEN))
        if extra_len > MAX_EXTRA_LEN:
            raise ProtocolError("record %d: extra of %d bytes (limit %d)" % (index, extra_len, MAX_EXTRA_LEN))
        if len(buf) - at < name_len + extra_len:
            raise ProtocolError("record %d is cut off by the end of the frame" % index)
        name = None
        if name_len:
            raw = bytes(buf[at:at + name_len])
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("record %d: name is not UTF-8: %r" % (index, raw)) from None
            if "\0" in name:
                raise ProtocolError("record %d: name contains NUL" % index)
        at += name_len
        extra = bytes(buf[at:at + extra_len])
        at += extra_len
        records.append(Record(k, name, value, extra))
    payload = bytes(buf[at:])
    if len(payload) != header["frame_bytes"]:
        raise ProtocolError(
            "header announces %d payload bytes but %d follow the records"
            % (header["frame_bytes"], len(payload))
        )
    return header, records, payload


# ---------------------------------------------------------------------------
# Receiving (sections 2 and 10)


def close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Message:
    def __init__(self, seq, payload, handles, frames):
        self.seq = seq
        self.payload = payload
        self.handles = handles  # [(fd, Record)], in record order
        self.frames = frames  # [(frame_handles, frame length)] per frame

    def close(self):
        close_all(fd for fd, _ in self.handles)
        self.handles = []


class Receiver:
    """Section 10, for a peer that gives up at the first broken message:
    every failure closes every descriptor of the message and raises, so the
    skipping state of the full procedure is never needed here."""

    def __init__(self, sock):
        self.sock = sock

    def recv_frame(self):
        """One record (section 2): (bytes, fds, msg_flags); bytes is None at
        end of stream."""
        data, ancdata, msg_flags, _ = self.sock.recvmsg(
            MAX_FRAME_LEN, CONTROL_LEN, socket.MSG_CMSG_CLOEXEC
        )
        fds = []
        rights = 0
        for level, ctype, cdata in ancdata:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                rights += 1
                got = array.array("i")
                got.frombytes(cdata[: len(cdata) - len(cdata) % got.itemsize])
                fds.extend(got)
        # The reference sends one SCM_RIGHTS message per frame at most
        # (section 2); be strict about it.
        if rights > 1:
            close_all(fds)
            raise ProtocolError("%d SCM_RIGHTS control messages on one record" % rights)
        if not data and not fds and not (msg_flags & socket.MSG_CTRUNC):
            return None, [], msg_flags
        return data, fds, msg_flags

    def recv_message(self):
        """The next message, or None at a clean end of stream."""
        building = None  # dict while a message is in progress
        try:
            while True:
                data, fds, msg_flags = self.recv_frame()
                if data is None:  # step 1
                    if building is not None:
                        raise ProtocolError(
                            "peer closed in the middle of message %d" % building["seq"]
                        )
                    return None
                try:
                    if msg_flags & socket.MSG_TRUNC:  # step 5
                        raise ProtocolError("frame larger than %d bytes (MSG_TRUNC)" % MAX_FRAME_LEN)
                    if msg_flags & socket.MSG_CTRUNC:  # step 6
                        raise ProtocolError("control data truncated (MSG_CTRUNC)")
                    header, records, payload = decode_frame(data)  # step 7
                    # Strictness about what a Linux *sender* must write.
                    for i, r in enumerate(records):
                        if r.value != 0 or r.extra:
                            raise ProtocolError(
                                "record %d: a Linux sender writes value 0 and no extra "
                                "(got value %d, %d extra bytes)" % (i, r.value, len(r.extra))
                            )
                    if len(fds) != header["frame_handles"]:  # step 10
                        if header["frame_handles"] == 0:
                            raise ProtocolError("%d descriptors on a frame that announced none" % len(fds))
                        raise ProtocolError(
                            "frame announced %d handles but %d descriptors came"
                            % (header["frame_handles"], len(fds))
                        )
                    seq = header["seq"]
                    if header["flags"] & FLAG_FIRST:  # step 11
                        if building is not None:
                            raise ProtocolError(
                                "message %d abandoned when message %d began" % (building["seq"], seq)
                            )
                        if header["total_handles"] > MAX_MESSAGE_HANDLES:
                            raise ProtocolError("message of %d handles exceeds our limit" % header["total_handles"])
                        if header["total_bytes"] > MAX_MESSAGE_BYTES:
                            raise ProtocolError("message of %d bytes exceeds our limit" % header["total_bytes"])
                        building = {
                            "seq": seq,
                            "total_handles": header["total_handles"],
                            "total_bytes": header["total_bytes"],
                            "payload": bytearray(),
                            "handles": [],
                            "frames": [],
                        }
                    if building is None:  # step 12
                        raise ProtocolError("continuation frame of message %d without its FIRST frame" % seq)
                    if building["seq"] != seq:
                        raise ProtocolError(
                            "frame of message %d while message %d was incomplete" % (seq, building["seq"])
                        )
                    if (header["total_handles"], header["total_bytes"]) != (
                        building["total_handles"],
                        building["total_bytes"],
                    ):  # step 13
                        raise ProtocolError("message %d changed its totals between frames" % seq)
                    have_handles = len(building["handles"]) + len(fds)
                    have_bytes = len(building["payload"]) + len(payload)
                    if have_handles > building["total_handles"] or have_bytes > building["total_bytes"]:
                        raise ProtocolError("message %d carries more than it announced" % seq)  # step 14
                    if header["flags"] & FLAG_LAST and (
                        have_handles != building["total_handles"] or have_bytes != building["total_bytes"]
                    ):  # step 15
                        raise ProtocolError(
                            "message %d ended with %d of %d handles and %d of %d bytes"
                            % (seq, have_handles, building["total_handles"], have_bytes, building["total_bytes"])
                        )
                except BaseException:
                    close_all(fds)
                    raise
                # Step 16: from here the descriptors belong to the message.
                building["handles"].extend(zip(fds, records))
                building["payload"] += payload
                building["frames"].append((len(fds), len(data)))
                if header["flags"] & FLAG_LAST:
                    done = building
                    building = None
                    return Message(done["seq"], bytes(done["payload"]), done["handles"], done["frames"])
        except BaseException:
            if building is not None:
                close_all(fd for fd, _ in building["handles"])
            raise


# ---------------------------------------------------------------------------
# The conversation


def expect(cond, what):
    if not cond:
        raise ProtocolError(what)


def self_check():
    """Our encoder must reproduce the worked example of section 13."""
    listening_tcp = socket_kind(FAMILY_IPV4, TYPE_STREAM, True)
    frame = (
        encode_header(FLAG_FIRST | FLAG_LAST, 0, 1, 2, 1, 2)
        + encode_record(listening_tcp, "http")
        + b"hi"
    )
    expect(frame == WORKED_EXAMPLE, "encoder disagrees with the worked example: %s" % frame.hex(" "))
    header, records, payload = decode_frame(WORKED_EXAMPLE)
    expect(header["flags"] == 3 and header["seq"] == 0 and payload == b"hi", "worked example decodes wrongly")
    expect(len(records) == 1 and records[0].name == "http", "worked example record decodes wrongly")
    expect(records[0].kind == listening_tcp, "worked example kind decodes as %r" % records[0].kind)
    expect(encode_header(FLAG_FIRST | FLAG_LAST, 1, 0, 0, 0, 0) == WORKED_EMPTY, "empty frame differs")


def take_socket(fd, record, declared, protocol):
    """Checks the declaration, then the real type (section 11), and returns
    the descriptor as a Python socket that owns it."""
    expect(
        record.kind == declared,
        "%r is declared as %r, expected %r" % (record.name, record.kind, declared),
    )
    real, proto = real_kind(fd)
    expect(real == declared, "%r is really a %r, not a %r" % (record.name, real, declared))
    if protocol is not None:
        expect(proto == protocol, "%r has protocol %r, expected %r" % (record.name, proto, protocol))
    return socket.socket(fileno=fd)


def connect(where):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(TIMEOUT)
    if where.startswith("@"):
        # Section 3: abstract name, a leading NUL and no terminator.
        sock.connect(b"\0" + where[1:].encode("utf-8"))
    else:
        sock.connect(where)
    return sock


def run(where):
    self_check()
    sock = connect(where)
    sender = Sender(sock)
    receiver = Receiver(sock)

    # Step 2: hand over a listening TCP socket.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    kind, _ = real_kind(listener.fileno())
    expect(kind == socket_kind(FAMILY_IPV4, TYPE_STREAM, True), "our listener is a %r?" % kind)
    sender.send(str(port).encode("ascii"), [Outgoing(listener.fileno(), "from-python", kind)])
    listener.close()
    print("peer.py: sent listener on 127.0.0.1:%d as 'from-python'" % port, file=sys.stderr)

    # Step 3: two sockets to write into.
    msg = receiver.recv_message()
    expect(msg is not None, "the Rust side closed before sending the sockets")
    try:
        expect(msg.payload == b"write your lines", "unexpected payload %r" % (msg.payload,))
        expect(len(msg.frames) == 1, "a small message came in %d frames" % len(msg.frames))
        names = [r.name for _, r in msg.handles]
        expect(names == ["unix-end", "tcp-conn"], "unexpected handles %r" % (names,))
        (unix_fd, unix_rec), (tcp_fd, tcp_rec) = msg.handles
        msg.handles = []  # ownership moves to the sockets below, one by one
        try:
            unix_end = take_socket(unix_fd, unix_rec, socket_kind(FAMILY_UNIX, TYPE_STREAM, False), None)
        except BaseException:
            close_all([unix_fd, tcp_fd])
            raise
        with unix_end:
            try:
                tcp_conn = take_socket(
                    tcp_fd, tcp_rec, socket_kind(FAMILY_IPV4, TYPE_STREAM, False), socket.IPPROTO_TCP
                )
            except BaseException:
                close_all([tcp_fd])
                raise
            with tcp_conn:
                unix_end.settimeout(TIMEOUT)
                tcp_conn.settimeout(TIMEOUT)
                unix_end.sendall(b"hello from python via unix\n")
                tcp_conn.sendall(b"hello from python via tcp\n")
    finally:
        msg.close()
    print("peer.py: wrote a line into each received socket", file=sys.stderr)

    # Step 4: a message over several frames.
    msg = receiver.recv_message()
    expect(msg is not None, "the Rust side closed before sending the big message")
    try:
        expect(len(msg.payload) == 150000, "big payload has %d bytes" % len(msg.payload))
        expect(msg.payload == bytes(i % 251 for i in range(150000)), "big payload content differs")
        expect(len(msg.handles) == 300, "big message has %d handles" % len(msg.handles))
        # 150000 payload bytes need at least 3 frames of at most 65536 bytes.
        expect(len(msg.frames) >= 3, "big message came in only %d frames" % len(msg.frames))
        for n, length in msg.frames:
            expect(n <= MAX_FRAME_HANDLES and length <= MAX_FRAME_LEN, "frame too big: %r" % ((n, length),))
        null_rdev = os.stat("/dev/null").st_rdev
        for i, (fd, record) in enumerate(msg.handles):
            expect(record.name == "null-%d" % i, "handle %d is named %r" % (i, record.name))
            expect(record.kind == Kind(KIND_CHAR_DEVICE), "handle %d declared as %r" % (i, record.kind))
            st = os.fstat(fd)
            expect(stat.S_ISCHR(st.st_mode) and st.st_rdev == null_rdev, "handle %d is not /dev/null" % i)
        frames = len(msg.frames)
        per_frame = [n for n, _ in msg.frames]
    finally:
        msg.close()
    print("peer.py: big message OK, handles per frame %r" % (per_frame,), file=sys.stderr)

    # Step 5: report back.
    sender.send(b"ok frames=%d handles=300 bytes=150000" % frames, [])

    # Step 6: the Rust side hangs up.
    msg = receiver.recv_message()
    if msg is not None:
        msg.close()
        raise ProtocolError("expected end of stream, got another message of %d bytes" % len(msg.payload))
    sock.close()


def main(argv):
    if len(argv) != 2:
        print("usage: peer.py SOCKET_PATH|@ABSTRACT_NAME", file=sys.stderr)
        return 2
    try:
        run(argv[1])
    except ProtocolError as e:
        print("peer.py: FAIL: %s" % e, file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print("peer.py: FAIL: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 1
    print("peer.py: all good", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
