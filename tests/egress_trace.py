"""Egress seen by strace: every socket address a traced process tree tried to reach.

A launcher runs under ``strace -f`` tracing the syscalls that name a destination
(``connect``, ``sendto``, ``sendmsg``, ``sendmmsg``) plus ``execve`` and the fork family,
so each call can be put down to the program that made it. `find_egress` reads the log and
lists every call that leaves the consortium's loopback: any address that is not loopback,
a loopback port that is not the consortium's, anything sent to port 53 (DNS, also to a
local stub resolver such as 127.0.0.53), and connections to the local services that
resolve names on a process's behalf (nscd, systemd-resolved, D-Bus, avahi). A connect to
such a service that failed because nothing listens there (ENOENT, ECONNREFUSED) carried
nothing: glibc tries nscd's socket for every user and host lookup, then resolves in the
process itself, where any DNS query shows up as port 53. A log that is empty, that lacks
the launcher, or in which no network call at all was seen is reported too: a trace that
saw nothing proves nothing.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

TRACED_SYSCALLS = ("execve", "clone", "clone3", "fork", "vfork", "connect", "sendto", "sendmsg", "sendmmsg")
DESTINATION_SYSCALLS = ("connect", "sendto", "sendmsg", "sendmmsg")
DNS_PORT = 53
# Local daemons a process asks to resolve names; a connection to one is a lookup that a
# trace of this process tree alone would not see go out.
RESOLVER_SOCKETS = {
    "/var/run/nscd/socket": "nscd",
    "/run/nscd/socket": "nscd",
    "/run/systemd/resolve/io.systemd.Resolve": "systemd-resolved",
    "/run/systemd/resolve/io.systemd.Resolve.Monitor": "systemd-resolved",
    "/run/dbus/system_bus_socket": "the D-Bus system bus (systemd-resolved, avahi)",
    "/var/run/dbus/system_bus_socket": "the D-Bus system bus (systemd-resolved, avahi)",
    "/run/avahi-daemon/socket": "avahi (mDNS)",
    "/var/run/avahi-daemon/socket": "avahi (mDNS)",
}
# A connect failing with these reached no daemon: nothing was asked.
NOTHING_LISTENS = ("ENOENT", "ECONNREFUSED")
# Families that cannot leave the machine: local sockets, the kernel, "disconnect" (AF_UNSPEC).
LOCAL_FAMILIES = ("AF_UNIX", "AF_NETLINK", "AF_UNSPEC")

_LINE = re.compile(r"^(?P<pid>\d+)\s+(?P<rest>.*)$")
_CALL = re.compile(r"^(?P<syscall>\w+)\(")
_RESUMED = re.compile(r"^<\.\.\. (?P<syscall>\w+) resumed>")
_RESULT = re.compile(r"\)\s+=\s+(?P<value>-?\d+)(?: (?P<error>E[A-Z0-9]+))?(?: \([^()]*\))?$")
_EXECVE = re.compile(r'^execve\("(?P<path>[^"]*)", \[(?P<argv>.*?)\](?:, | <unfinished)')
_PORT = re.compile(r"sin6?_port=htons\((?P<port>\d+)\)")
_INET_ADDR = re.compile(r'inet_addr\("(?P<address>[^"]+)"\)')
_INET6_ADDR = re.compile(r'inet_pton\(AF_INET6, "(?P<address>[^"]+)"')
_UNIX_PATH = re.compile(r'sun_path=(?P<abstract>@?)"(?P<path>(?:[^"\\]|\\.)*)"')
_FAMILY = re.compile(r"sa_family=(?P<family>\w+)")


@dataclass(frozen=True)
class Destination:
    """One socket address handed to a syscall by process ``pid``."""

    pid: int
    syscall: str
    family: str
    address: str | None  # IP address or Unix socket path; None for other families
    port: int | None
    line: str
    error: str | None = None  # errno name if the call failed, e.g. ENOENT; None if it succeeded or never returned


@dataclass
class Trace:
    """What a strace log says: who ran what, and which addresses they used."""

    lines: int = 0
    programs: dict[int, str] = field(default_factory=dict)  # pid -> command line it exec'd
    parents: dict[int, int] = field(default_factory=dict)  # pid -> the pid that created it
    destinations: list[Destination] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # a connect whose address strace could not print

    def program_of(self, pid: int) -> str:
        """The command line ``pid`` runs: its own execve, else its nearest ancestor's."""
        seen = set()
        while pid not in self.programs and pid in self.parents and pid not in seen:
            seen.add(pid)
            pid = self.parents[pid]
        return self.programs.get(pid, f"pid {pid} (not exec'd under the trace)")


@dataclass(frozen=True)
class EgressPolicy:
    """Where traced processes may connect: loopback only, on ``loopback_ports`` (None: any)."""

    loopback_ports: frozenset[int] | None

    def problem(self, destination: Destination) -> str | None:
        """Why ``destination`` is egress, or None if it stays inside the consortium's loopback."""
        family, address, port = destination.family, destination.address, destination.port
        if family in ("AF_INET", "AF_INET6"):
            where = f"{address}:{port}" if family == "AF_INET" else f"[{address}]:{port}"
            if port == DNS_PORT:
                return f"DNS query to {where}"
            if not _is_loopback(address):
                return f"connection to {where} (not loopback)"
            if self.loopback_ports is not None and port not in self.loopback_ports:
                return f"connection to loopback port {port}, not one of the consortium's"
            return None
        if family == "AF_UNIX":
            resolver = RESOLVER_SOCKETS.get(address or "")
            if resolver is None or (destination.syscall == "connect" and destination.error in NOTHING_LISTENS):
                return None
            return f"name lookup through {resolver} ({address})"
        if family in LOCAL_FAMILIES:
            return None
        return f"{family} socket address"


def strace_command(log: Path) -> list[str]:
    """The strace prefix for a launcher: follow every child, write ``log``, keep the child's exit code."""
    return [
        "strace",
        "-f",
        "-qq",
        "--seccomp-bpf",
        "-e",
        "signal=none",
        "-s",
        "200",
        "-e",
        f"trace={','.join(TRACED_SYSCALLS)}",
        "-o",
        str(log),
        "--",
    ]


def parse_trace(text: str) -> Trace:
    """Read an ``strace -f`` log written with `strace_command`."""
    trace = Trace()
    waiting: dict[int, int] = {}  # pid -> index of its destination whose call has not returned yet
    for raw in text.splitlines():
        match = _LINE.match(raw)
        if match is None:
            continue
        trace.lines += 1
        pid, rest = int(match["pid"]), match["rest"]
        call = _CALL.match(rest) or _RESUMED.match(rest)
        if call is None:
            continue
        syscall = call["syscall"]
        if syscall == "execve":
            _read_execve(trace, pid, rest)
        elif syscall in ("clone", "clone3", "fork", "vfork"):
            result = _RESULT.search(rest)
            if result is not None and int(result["value"]) > 0:
                trace.parents[int(result["value"])] = pid
        elif syscall in DESTINATION_SYSCALLS and rest.startswith("<..."):
            if pid in waiting:  # the result of a call strace printed unfinished
                index = waiting.pop(pid)
                trace.destinations[index] = replace(trace.destinations[index], error=_error(rest))
        elif syscall in DESTINATION_SYSCALLS:
            found = [_destination(pid, syscall, struct, raw) for struct in _sockaddrs(rest)]
            if syscall == "connect" and not found:
                trace.unreadable.append(raw)
            if rest.endswith("<unfinished ...>") and found:
                waiting[pid] = len(trace.destinations)
            trace.destinations.extend(replace(d, error=_error(rest)) for d in found)
    return trace


def find_egress(text: str, policy: EgressPolicy, launcher: str) -> list[str]:
    """Every problem in the trace ``text`` of ``launcher`` (a command-line fragment); [] if none.

    Besides each call that leaves the consortium's loopback, reports a trace that cannot
    prove anything: empty, without ``launcher`` in it, or without a single traced address.
    """
    trace = parse_trace(text)
    if trace.lines == 0:
        return ["the trace is empty: strace did not run or wrote elsewhere"]
    problems = []
    if not any(launcher in program for program in trace.programs.values()):
        problems.append(f"{launcher!r} never started under the trace")
    if not trace.destinations:
        problems.append("no socket address was traced at all: the trace saw no network calls")
    for destination in trace.destinations:
        reason = policy.problem(destination)
        if reason is not None:
            problems.append(f"{reason}, by {trace.program_of(destination.pid)}: {destination.line.strip()}")
    problems += [f"connect to an address strace could not read: {line.strip()}" for line in trace.unreadable]
    return problems


def _error(rest: str) -> str | None:
    result = _RESULT.search(rest)
    return result["error"] if result is not None else None


def _read_execve(trace: Trace, pid: int, rest: str) -> None:
    result = _RESULT.search(rest)
    if result is not None and int(result["value"]) != 0:
        return  # a failed attempt, e.g. one PATH entry that does not hold the program
    match = _EXECVE.match(rest)
    if match is not None:
        argv = re.findall(r'"((?:[^"\\]|\\.)*)"', match["argv"])
        trace.programs[pid] = " ".join(argv) or match["path"]


def _sockaddrs(text: str) -> list[str]:
    """Each ``{sa_family=...}`` struct in ``text``, outside the quoted data strace prints."""
    found, quoted, index = [], False, 0
    while index < len(text):
        char = text[index]
        if quoted:
            if char == "\\":
                index += 1
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif text.startswith("{sa_family=", index):
            end = _closing_brace(text, index)
            found.append(text[index : end + 1])
            index = end
        index += 1
    return found


def _closing_brace(text: str, start: int) -> int:
    depth, quoted, index = 0, False, start
    while index < len(text):
        char = text[index]
        if quoted:
            if char == "\\":
                index += 1
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return len(text) - 1  # cut short: the rest of the line is the struct


def _destination(pid: int, syscall: str, struct: str, line: str) -> Destination:
    family = _FAMILY.search(struct)["family"]
    port = _PORT.search(struct)
    if family == "AF_INET":
        address = _INET_ADDR.search(struct)
    elif family == "AF_INET6":
        address = _INET6_ADDR.search(struct)
    else:
        address = None
    path = _UNIX_PATH.search(struct) if family == "AF_UNIX" else None
    if path is not None:
        where = ("@" if path["abstract"] else "") + path["path"]
    else:
        where = address["address"] if address is not None else None
    return Destination(
        pid=pid,
        syscall=syscall,
        family=family,
        address=where,
        port=int(port["port"]) if port is not None else None,
        line=line,
    )


def _is_loopback(address: str | None) -> bool:
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
