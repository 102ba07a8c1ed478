#!/usr/bin/env python3
"""Record real CRIU page-server traffic (CRIU 3.17/4.1 24-byte protocol) for kup's protocol tests.

Creates an AF_UNIX SOCK_STREAM socketpair, hands one end to `criu dump|pre-dump --page-server --ps-socket FD`,
acts as the page server on the other end (answers OPEN2 with has_parent, PARENT with an int32, CLOSE and
FORCE_CLOSE with int32 0, swallows ADD_F data) and saves exactly what it received and what it sent:

  OUT/NAME.rx.bin        every byte CRIU sent, in order
  OUT/NAME.tx.bin        every byte this server replied, in order
  OUT/NAME.summary.txt   one line per message (decoded header, data length, reply), then per-image totals
  OUT/NAME.meta.txt      criu version, command line, exit status, timing, subject process

By default it spawns its own subject: scripts/criu-host/pattern.c built into a temp dir and run under
`setsid -f` with PRIVATE_KIB of private anonymous memory (16 untouched pages in the middle) and SHARED_KIB of
MAP_SHARED anonymous memory, all filled with a known pattern; the pattern pages received are verified.

  record-page-server.py --name dump-4m                       # full dump, has_parent=0
  record-page-server.py --action pre-dump --name predump     # pre-dump (needs soft-dirty in the kernel)
  record-page-server.py --pid 1234 --name x -- --shell-job   # dump an existing process; extra criu args

This is also a minimal reference of the server side of the protocol; it never writes CRIU images.
"""
import argparse
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

HDR = struct.Struct("<IIQQ")  # cmd, nr_pages, vaddr, dst_id: raw host-endian struct page_server_iov
PAGE = 4096
CMDS = {1: "ADD", 2: "HOLE", 3: "OPEN", 4: "OPEN2", 5: "PARENT", 6: "ADD_F", 7: "GET",
        0x1023: "CLOSE", 0x1024: "FORCE_CLOSE"}
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4
TYPES = {1: "pid", 2: "shmem"}
HERE = os.path.dirname(os.path.abspath(__file__))


def flag_names(flags):
    names = [n for bit, n in ((PE_PARENT, "PARENT"), (PE_LAZY, "LAZY"), (PE_PRESENT, "PRESENT")) if flags & bit]
    rest = flags & ~7
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"


def word(seed, region, off):
    """pattern.c's word(): the value of the 8-byte word at byte offset off of region (1 private, 2 shared)."""
    m = (1 << 64) - 1
    x = (seed ^ ((region * 0x9E3779B97F4A7C15) & m) ^ ((off * 0xBF58476D1CE4E5B9) & m)) & m
    return x ^ (x >> 31)


def expected_page(seed, region, off):
    return struct.pack("<512Q", *(word(seed, region, off + i * 8) for i in range(512)))


class Recorder:
    def __init__(self, sock, has_parent, parent_reply, pages=None):
        self.sock = sock
        self.pages = pages  # for GET: {pid: PageSource}
        self.has_parent = has_parent
        self.parent_reply = parent_reply
        self.rx = bytearray()
        self.tx = bytearray()
        self.msgs = []
        self.end = None

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                break
            buf += chunk
        self.rx += buf
        return bytes(buf)

    def reply(self, data):
        self.sock.sendall(data)
        off = len(self.tx)
        self.tx += data
        return off

    def serve(self):
        while True:
            rx_off = len(self.rx)
            raw = self.recv_exact(HDR.size)
            if len(raw) == 0:
                self.end = "EOF"
                return
            if len(raw) < HDR.size:
                self.end = "EOF inside a header (%d of %d bytes)" % (len(raw), HDR.size)
                return
            cmd_raw, nr_pages, vaddr, dst_id = HDR.unpack(raw)
            cmd, flags = cmd_raw & 0xFFFF, cmd_raw >> 16
            m = dict(i=len(self.msgs), rx_off=rx_off, cmd_raw=cmd_raw, cmd=cmd, flags=flags,
                     nr_pages=nr_pages, vaddr=vaddr, dst_id=dst_id, data=b"", reply=b"", tx_off=None)
            self.msgs.append(m)
            name = CMDS.get(cmd)
            if name is None:
                self.end = "unknown command 0x%x: stopped reading" % cmd
                return
            if cmd == 1 or (cmd == 6 and flags & PE_PRESENT):
                m["data"] = self.recv_exact(nr_pages * PAGE)
                if len(m["data"]) < nr_pages * PAGE:
                    self.end = "EOF inside the data of message %d" % m["i"]
                    return
            if cmd == 4:
                m["reply"] = bytes([self.has_parent])
            elif cmd == 5:
                m["reply"] = struct.pack("<i", self.parent_reply)
            elif cmd in (0x1023, 0x1024):
                m["reply"] = struct.pack("<i", 0)
            elif cmd == 7:
                src = (self.pages or {}).get(dst_id)
                data = src.read(vaddr, nr_pages) if src else None
                if data is None:
                    self.end = "GET for pages this server does not have (message %d)" % m["i"]
                    return
                m["reply"] = HDR.pack(6 | PE_PRESENT << 16, nr_pages, vaddr, dst_id) + data
            if m["reply"]:
                m["tx_off"] = self.reply(m["reply"])
            if cmd == 0x1024:
                self.end = "FORCE_CLOSE"
                return
            if cmd == 0x1023:
                rest = self.recv_exact(1)  # the real server waits for the peer's EOF after CLOSE
                self.end = "CLOSE" if not rest else "CLOSE, then unexpected bytes"
                return


def varint(b, i):
    v = shift = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return v, i


def pb_varints(msg):
    """The varint fields of a protobuf message as {field: value} (pagemap messages have only varints)."""
    out, i = {}, 0
    while i < len(msg):
        key, i = varint(msg, i)
        if key & 7 != 0:
            raise ValueError("unexpected wire type %d" % (key & 7))
        out[key >> 3], i = varint(msg, i)
    return out


class PageSource:
    """Pages of one task from CRIU's local images: pagemap-<pid>.img (protobuf stream) + pages-<id>.img."""

    def __init__(self, imgdir, pid):
        raw = open(os.path.join(imgdir, "pagemap-%d.img" % pid), "rb").read()
        magic = struct.unpack_from("<II", raw)
        if magic != (0x54564319, 0x56084025):
            raise ValueError("pagemap-%d.img: bad magic %x %x" % (pid, *magic))
        recs, i = [], 8
        while i < len(raw):
            (n,) = struct.unpack_from("<I", raw, i)
            recs.append(pb_varints(raw[i + 4:i + 4 + n]))
            i += 4 + n
        self.pages_file = os.path.join(imgdir, "pages-%d.img" % recs[0][1])
        self.entries, off = [], 0  # (vaddr, nr_pages, flags, file offset or None)
        for e in recs[1:]:
            flags = e.get(4, PE_PARENT if e.get(3) else PE_PRESENT)
            self.entries.append((e[1], e[2], flags, off if flags & PE_PRESENT else None))
            if flags & PE_PRESENT:
                off += e[2] * PAGE

    def read(self, vaddr, nr_pages):
        for start, n, flags, off in self.entries:
            if off is not None and start <= vaddr and vaddr + nr_pages * PAGE <= start + n * PAGE:
                with open(self.pages_file, "rb") as f:
                    f.seek(off + vaddr - start)
                    return f.read(nr_pages * PAGE)
        return None


def decode_dst(cmd, dst_id):
    if cmd in (0x1023, 0x1024):
        return "-"
    if cmd == 7:
        return "pid=%d" % dst_id
    typ, ident = dst_id & 0xFF, dst_id >> 8
    return "type=%s id=%d" % (TYPES.get(typ, str(typ)), ident)


def build_pattern(workdir):
    exe = os.path.join(workdir, "pattern")
    subprocess.run(["cc", "-O2", "-Wall", "-o", exe, os.path.join(HERE, "pattern.c")], check=True)
    return exe


def spawn_pattern(exe, workdir, priv_kib, shr_kib, seed):
    status = os.path.join(workdir, "status")
    with open(os.devnull, "rb") as null_in, open(os.path.join(workdir, "pattern.out"), "wb") as out:
        # a minimal environment: the subject's stack pages end up in the recording
        subprocess.run(["setsid", "-f", exe, status, str(priv_kib), str(shr_kib), str(seed)],
                       stdin=null_in, stdout=out, stderr=out, check=True, cwd="/",
                       env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    for _ in range(400):
        try:
            with open(status) as f:
                line = f.read().split()
            if line and line[0] == "READY":
                # READY <pid> private=<addr> <kib> shared=<addr|(nil)> <kib>
                pid = int(line[1])
                paddr = int(line[2].split("=")[1], 16)
                saddr = line[4].split("=")[1]
                saddr = 0 if saddr == "(nil)" else int(saddr, 16)
                return pid, paddr, int(line[3]) * 1024, saddr, int(line[5]) * 1024
        except (FileNotFoundError, IndexError, ValueError):
            pass
        time.sleep(0.025)
    raise SystemExit("pattern process did not become ready")


def wait_pid_gone(pid):
    # the dumped task is killed by criu and reaped by its parent (init) a moment later; restore needs the pid
    for _ in range(500):
        if not os.path.exists("/proc/%d" % pid):
            return
        time.sleep(0.01)
    raise SystemExit("pid %d still exists after the dump" % pid)


def self_check(workdir, pid):
    """Ask a (restored) pattern process to verify its memory; returns its status line."""
    status = os.path.join(workdir, "status")
    try:
        os.unlink(status)
    except FileNotFoundError:
        pass
    try:
        os.kill(pid, 10)  # SIGUSR1
    except ProcessLookupError:
        return "process %d does not exist" % pid
    for _ in range(400):
        try:
            with open(status) as f:
                line = f.read().strip()
            if line:
                return line
        except FileNotFoundError:
            pass
        time.sleep(0.025)
    return "no answer"


def default_criu():
    if os.environ.get("CRIU"):
        return os.environ["CRIU"]
    out = subprocess.run([os.path.join(HERE, "install.sh")], check=True, stdout=subprocess.PIPE, text=True)
    return out.stdout.strip().splitlines()[-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--criu", help="criu binary or wrapper (default: $CRIU, else what install.sh prints)")
    ap.add_argument("--action", default="dump", choices=["dump", "pre-dump", "lazy"],
                    help="lazy: dump locally, then record `criu lazy-pages --page-server --ps-socket FD` "
                         "during `criu restore --lazy-pages`, answering GET from the local images")
    ap.add_argument("--name", required=True, help="file name stem of the recording")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "..", "foam-store", "tests", "fixtures"))
    ap.add_argument("--pid", type=int, help="dump this existing process instead of spawning pattern.c")
    ap.add_argument("--private-kib", type=int, default=4096)
    ap.add_argument("--shared-kib", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0x6B7570)
    ap.add_argument("--has-parent", type=int, default=0, choices=[0, 1], help="1-byte reply to OPEN2")
    ap.add_argument("--parent-reply", type=int, default=0, help="int32 reply to PARENT")
    ap.add_argument("--images-dir", help="criu -D (default: a temp dir, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (images, criu log)")
    ap.add_argument("criu_args", nargs="*", help="extra criu arguments (after --)")
    a = ap.parse_args()

    criu = a.criu or default_criu()
    version = subprocess.run([criu, "--version"], stdout=subprocess.PIPE, text=True).stdout.strip()
    tmp = tempfile.mkdtemp(prefix="kup-ps-rec.")
    imgdir = a.images_dir or os.path.join(tmp, "img")
    os.makedirs(imgdir, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)

    subject = None
    if a.pid:
        pid = a.pid
        subject_desc = "existing pid %d (%s)" % (pid, open("/proc/%d/comm" % pid).read().strip())
    else:
        exe = build_pattern(tmp)
        pid, paddr, plen, saddr, slen = spawn_pattern(exe, tmp, a.private_kib, a.shared_kib, a.seed)
        subject = (paddr, plen, saddr, slen)
        subject_desc = ("scripts/criu-host/pattern.c: pattern STATUS %d %d %d -> pid %d, private 0x%x+%d KiB "
                        "(pages %d..%d never touched), shared 0x%x+%d KiB"
                        % (a.private_kib, a.shared_kib, a.seed, pid, paddr, plen // 1024,
                           plen // PAGE // 2, plen // PAGE // 2 + 15, saddr, slen // 1024))

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = theirs.fileno()
    pages, restore_cmd, restore_rc, restored = None, None, None, None
    if a.action == "lazy":
        if a.pid:
            raise SystemExit("--action lazy needs its own subject (no --pid)")
        local = [criu, "dump", "-t", str(pid), "-D", imgdir, "-o", "dump.log", "-v4"] + a.criu_args
        subprocess.run(local, check=True)
        wait_pid_gone(pid)
        pages = {pid: PageSource(imgdir, pid)}
        cmd = [criu, "lazy-pages", "-D", imgdir, "-o", "lazy-pages.log", "-v4",
               "--page-server", "--ps-socket", str(fd)]
        restore_cmd = [criu, "restore", "--lazy-pages", "-D", imgdir, "-d", "-o", "restore.log", "-v4"]
        cmd_desc = "%s  (after: %s; then concurrently: %s)" % (" ".join(cmd), " ".join(local), " ".join(restore_cmd))
    else:
        cmd = [criu, a.action, "-t", str(pid), "-D", imgdir, "-o", "%s.log" % a.action, "-v4",
               "--page-server", "--ps-socket", str(fd)] + a.criu_args
        cmd_desc = " ".join(cmd)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, pass_fds=(fd,))
    theirs.close()
    restore = None
    if restore_cmd:
        sock_path = os.path.join(imgdir, "lazy-pages.socket")
        for _ in range(400):
            if os.path.exists(sock_path) or proc.poll() is not None:
                break
            time.sleep(0.01)
        restore = subprocess.Popen(restore_cmd)
    rec = Recorder(ours, a.has_parent, a.parent_reply, pages)
    try:
        rec.serve()
    finally:
        ours.close()
        rc = proc.wait()
        if restore:
            restore_rc = restore.wait()
    elapsed = time.monotonic() - t0
    if restore and subject:
        restored = self_check(tmp, pid)

    stem = os.path.join(a.out, a.name)
    with open(stem + ".rx.bin", "wb") as f:
        f.write(rec.rx)
    with open(stem + ".tx.bin", "wb") as f:
        f.write(rec.tx)

    # decoded summary
    lines, images, verified, mismatched = [], {}, [0, 0], []
    for m in rec.msgs:
        name = CMDS.get(m["cmd"], "?")
        line = ("%3d rx@%-8d cmd=%-11s raw=0x%08x flags=%d(%s) nr_pages=%d vaddr=0x%x dst_id=0x%x %s data=%d"
                % (m["i"], m["rx_off"], name, m["cmd_raw"], m["flags"], flag_names(m["flags"]), m["nr_pages"],
                   m["vaddr"], m["dst_id"], decode_dst(m["cmd"], m["dst_id"]), len(m["data"])))
        if m["data"]:
            line += " sha256=%s" % hashlib.sha256(m["data"]).hexdigest()[:16]
        if len(m["reply"]) > HDR.size:
            rc_, rn, rv, rd = HDR.unpack_from(m["reply"])
            line += (" reply@%d=[raw=0x%08x nr_pages=%d vaddr=0x%x dst_id=0x%x]+%d data sha256=%s"
                     % (m["tx_off"], rc_, rn, rv, rd, len(m["reply"]) - HDR.size,
                        hashlib.sha256(m["reply"][HDR.size:]).hexdigest()[:16]))
        elif m["reply"]:
            line += " reply@%d=%s" % (m["tx_off"], m["reply"].hex())
        lines.append(line)
        if m["cmd"] in (4, 6):
            key = decode_dst(m["cmd"], m["dst_id"])
            img = images.setdefault(key, {"entries": 0, "pages": 0, "data_pages": 0, "flags": {}})
            if m["cmd"] == 6:
                img["entries"] += 1
                img["pages"] += m["nr_pages"]
                img["data_pages"] += len(m["data"]) // PAGE
                img["flags"][m["flags"]] = img["flags"].get(m["flags"], 0) + m["nr_pages"]
        # page data this message carries: ADD_F's payload, or a GET reply's payload (GET dst_id = bare pid)
        pdata, typ, owner = m["data"], m["dst_id"] & 0xFF, m["dst_id"] >> 8
        if m["cmd"] == 7:
            pdata, typ, owner = m["reply"][HDR.size:], 1, m["dst_id"]
        if subject and pdata:
            paddr, plen, saddr, slen = subject
            for k in range(len(pdata) // PAGE):
                page = pdata[k * PAGE:(k + 1) * PAGE]
                if typ == 1 and owner == pid and paddr <= m["vaddr"] + k * PAGE < paddr + plen:
                    off, region, idx = m["vaddr"] + k * PAGE - paddr, 1, 0
                elif typ == 2 and slen and m["vaddr"] + k * PAGE < slen:
                    off, region, idx = m["vaddr"] + k * PAGE, 2, 1
                else:
                    continue
                if page == expected_page(a.seed, region, off):
                    verified[idx] += 1
                else:
                    mismatched.append((m["i"], region, off))
    lines.append("end: %s; criu exit status %d" % (rec.end, rc))
    for key, img in images.items():
        lines.append("image %s: %d ADD_F entries, %d pages named, %d pages of data, pages by flags %s"
                     % (key, img["entries"], img["pages"], img["data_pages"],
                        ", ".join("%d:%d" % kv for kv in sorted(img["flags"].items()))))
    if subject:
        lines.append("pattern pages verified: private %d, shared %d; mismatches %d %s"
                     % (verified[0], verified[1], len(mismatched), mismatched[:5]))
    with open(stem + ".summary.txt", "w") as f:
        f.write("\n".join(lines) + "\n")

    log_path = os.path.join(imgdir, "%s.log" % ("lazy-pages" if a.action == "lazy" else a.action))
    errors = []
    if os.path.exists(log_path):
        errors = [l.rstrip() for l in open(log_path, errors="replace") if "Error" in l or "BUG" in l]
    meta = [
        "criu: %s" % criu,
        "criu --version: %s" % version.replace("\n", "; "),
        "kernel: %s" % os.uname().release,
        "command: %s" % cmd_desc,
        "subject: %s" % subject_desc,
        "server replies: OPEN2 -> %d (1 byte), PARENT -> %d (int32), CLOSE/FORCE_CLOSE -> 0 (int32)"
        % (a.has_parent, a.parent_reply),
        "criu exit status: %d; elapsed %.3f s; session end: %s" % (rc, elapsed, rec.end),
        "received %d bytes in %d messages, sent %d bytes" % (len(rec.rx), len(rec.msgs), len(rec.tx)),
    ]
    if restore_cmd:
        meta.append("criu restore --lazy-pages exit status: %s; restored process self-check: %s"
                    % (restore_rc, restored))
    meta.append("criu log errors (%s):" % os.path.basename(log_path))
    meta += ["  " + e for e in errors]
    with open(stem + ".meta.txt", "w") as f:
        f.write("\n".join(meta) + "\n")
    sys.stdout.write("\n".join(meta) + "\n" + "\n".join(lines[-(len(images) + 2):]) + "\n")

    if subject:
        # stop the subject if criu left it running (pre-dump, failures)
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass
    if a.keep or a.images_dir:
        print("images and log: %s" % imgdir)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
