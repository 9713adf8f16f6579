#!/usr/bin/env python3
"""Like /tmp/hvpatch-dumps/dump.py (the lead's snapshot script), but boots with pti=on and parks two
user-mode busy loops so that a vCPU is caught in user mode holding the PTI user PGD (CR3 bit 12).
Writes /tmp/hvpatch-dumps-pti/<ver>/. Usage: python3 introspect/tests/dump_pti.py 6.12"""
import os, sys, subprocess, socket, time, select, shutil
ver = sys.argv[1]  # 6.1 or 6.12
C = os.path.expanduser("~/.cache/hvpatch")
out = f"/tmp/hvpatch-dumps-pti/{ver}"
os.makedirs(out, exist_ok=True)
mem = f"/dev/shm/hvdump-pti-{ver}.ram"
mon = f"/tmp/hvdump-pti-{ver}.mon"
for p in (mem, mon):
    if os.path.exists(p): os.unlink(p)
cpu = "max,la57=off" if ver == "6.1" else "max"
q = subprocess.Popen(["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", cpu, "-smp", "2",
    "-m", "512M", "-object", f"memory-backend-file,id=ram0,size=512M,mem-path={mem},share=on",
    "-machine", "memory-backend=ram0", "-kernel", f"{C}/kernels/{ver}/vmlinuz",
    "-initrd", f"{C}/initramfs.cpio.gz", "-append", "console=ttyS0 panic=-1 pti=on",
    "-display", "none", "-serial", "stdio", "-monitor", f"unix:{mon},server=on,wait=off", "-no-reboot"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
buf = b""
def read_until(marker, timeout=120):
    global buf
    end = time.time() + timeout
    while marker not in buf:
        r, _, _ = select.select([q.stdout], [], [], max(0, end - time.time()))
        if not r: raise SystemExit(f"timeout waiting for {marker!r}; tail: {buf[-500:]!r}")
        d = os.read(q.stdout.fileno(), 1 << 16)
        if not d: raise SystemExit("qemu exited")
        buf += d
    i = buf.index(marker) + len(marker)
    res, buf = buf[:i], buf[i:]
    return res
read_until(b"hvpatch-guest: ready")
time.sleep(1)
def run(cmd, timeout=300):
    q.stdin.write(cmd.encode() + b"; echo __DO\"\"NE__$?\n"); q.stdin.flush()
    r = read_until(b"__DONE__", timeout)
    read_until(b"\n")
    return r
run("stty -echo; PS1=")
run("sleep 1000 & sh -c 'while :; do :; done' & sh -c 'while :; do :; done' & true")
time.sleep(2)
for name, cmd in [("kallsyms.txt", "cat /proc/kallsyms"), ("ps.txt", "ps -o pid,comm,stat"),
                  ("stacks.txt", "for p in /proc/[0-9]*; do echo \"== ${p#/proc/} $(cat $p/comm)\"; cat $p/stack; done"),
                  ("cmdline.txt", "cat /proc/cmdline"), ("uname.txt", "uname -a")]:
    t = time.time()
    r = run(cmd)
    open(f"{out}/{name}", "wb").write(r.replace(b"\r\n", b"\n").rsplit(b"__DONE__", 1)[0])
    print(name, len(r), f"{time.time()-t:.1f}s", flush=True)
s = socket.socket(socket.AF_UNIX); s.connect(mon)
def hmp(c):
    s.sendall(c.encode() + b"\n"); time.sleep(1.0)
    d = b""
    s.settimeout(1.0)
    try:
        while True:
            x = s.recv(1 << 16)
            if not x: break
            d += x
    except socket.timeout: pass
    return d.decode(errors="replace")
hmp("stop")
open(f"{out}/regs.txt", "w").write(hmp("info registers -a"))
shutil.copy(mem, f"{out}/ram.bin")
hmp("cont")
run("echo o > /proc/sysrq-trigger" if False else "true")
q.kill(); q.wait()
os.unlink(mem)
print("done", out)
