"""Splits a folded profile (inferno-collapse-perf --kernel) of one server process by owner.

User time goes to the innermost frame of a known crate on the stack; kernel time (frames
ending in _[k]) goes to the syscall it is in and to the connection that entered it (fred's
Redis connections or hyper's HTTP ones).
"""
import collections
import re
import sys

OWNERS = ["tower_redis_cache", "fred", "redis_protocol", "hyper_util", "hyper", "axum",
          "tokio", "mio", "moka", "blake3"]
SAME = {"redis_protocol": "fred", "hyper_util": "hyper", "mio": "tokio"}
SYSCALLS = {"do_writev": "writev (socket writes; on loopback includes delivery to the peer)",
            "ksys_write": "write", "__x64_sys_recvfrom": "recvfrom (socket reads)",
            "__x64_sys_epoll_wait": "epoll_wait", "__x64_sys_futex": "futex (wakeups)",
            "exit_to_user_mode_loop": "return to user (scheduling)"}


def crate(frame):
    m = re.match(r"[<&\s]*(?:dyn )?([A-Za-z_][A-Za-z0-9_]*)::", frame)
    return m.group(1) if m else None


def main(path):
    total = 0
    user, kernel = collections.Counter(), collections.Counter()
    syscalls, entered = collections.Counter(), collections.Counter()
    for line in open(path):
        stack, n = line.rstrip().rsplit(" ", 1)
        n = int(n)
        total += n
        frames = stack.split(";")
        owner = "other"
        for f in reversed([f for f in frames if not f.endswith("_[k]")]):
            if crate(f) in OWNERS:
                owner = SAME.get(crate(f), crate(f))
                break
        if not frames[-1].endswith("_[k]"):
            user[owner] += n
            continue
        kernel[owner] += n
        call = "interrupt / page fault / vdso"
        for i, f in enumerate(frames[:-1]):
            if f == "do_syscall_64_[k]":
                call = frames[i + 1][:-4]
                break
        syscalls[SYSCALLS.get(call, call)] += n
        names = " ".join(frames)
        if "fred::" in names:
            entered["fred (Redis connections)"] += n
        elif "hyper::" in names or "hyper_util::" in names:
            entered["hyper (HTTP connections)"] += n
        else:
            entered["tokio runtime / other"] += n
    pct = lambda n: f"{100 * n / total:5.1f} %"
    print(f"{'owner (innermost crate frame)':32} {'user':>8} {'kernel':>8}")
    for o in sorted(set(user) | set(kernel), key=lambda o: -(user[o] + kernel[o])):
        print(f"{o:32} {pct(user[o]):>8} {pct(kernel[o]):>8}")
    print(f"{'all':32} {pct(sum(user.values())):>8} {pct(sum(kernel.values())):>8}")
    print("\nkernel time by syscall:")
    for s, n in syscalls.most_common(8):
        print(f"  {s:68} {pct(n)}")
    print("kernel time by the connection that entered it:")
    for s, n in entered.most_common():
        print(f"  {s:68} {pct(n)}")


if __name__ == "__main__":
    main(sys.argv[1])
