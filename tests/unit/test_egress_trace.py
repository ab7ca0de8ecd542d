"""The strace reader that proves zero egress (tests/egress_trace.py), on lines strace wrote.

The lines below are verbatim from traces taken on this machine (before the fix, a hand-
started site looked up telemetry.flower.ai), with process ids renumbered so that they
form one process tree; two results are changed where the text says so.
"""

import subprocess
import sys

import pytest

from ..egress_trace import EgressPolicy, find_egress, parse_trace, strace_command

SITE = "fedgen site start"
CONSORTIUM = EgressPolicy(loopback_ports=frozenset({45173, 36635}))

LAUNCH = r"""
6199  execve("/work/wt-egress/.venv/bin/fedgen", ["/work/wt-egress/.venv/bin/fedgen", "site", "start", "--config", "c1/sites/site-0/site.toml"], 0x7ffc85400ac0 /* 37 vars */) = 0
6199  clone3({flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM|CLONE_SETTLS|CLONE_PARENT_SETTID|CLONE_CHILD_CLEARTID, child_tid=0x7ffb055ff990, parent_tid=0x7ffb055ff990, exit_signal=0, stack=0x7ffb04dff000, stack_size=0x7ff540, tls=0x7ffb055ff6c0} <unfinished ...>
6199  <... clone3 resumed> => {parent_tid=[6323]}, 88) = 6323
6199  connect(13, {sa_family=AF_INET, sin_port=htons(45173), sin_addr=inet_addr("127.0.0.1")}, 16) = -1 EINPROGRESS (Operation now in progress)
"""
TELEMETRY_LOOKUP = r"""
6323  connect(4, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = -1 ENOENT (No such file or directory)
6323  connect(3, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = -1 ENOENT (No such file or directory)
6323  connect(3, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.255.255.53")}, 16) = 0
6323  sendmmsg(3, [{msg_hdr={msg_name=NULL, msg_namelen=0, msg_iov=[{iov_base="[B\1\0\0\1\0\0\0\0\0\0\ttelemetry\6flower\2ai\0\0\1\0\1", iov_len=37}], msg_iovlen=1, msg_controllen=0, msg_flags=0}, msg_len=37}, {msg_hdr={msg_name=NULL, msg_namelen=0, msg_iov=[{iov_base="YG\1\0\0\1\0\0\0\0\0\0\ttelemetry\6flower\2ai\0\0\34\0\1", iov_len=37}], msg_iovlen=1, msg_controllen=0, msg_flags=0}, msg_len=37}], 2, MSG_NOSIGNAL) = 2
"""
CONSORTIUM_TRAFFIC = r"""
6331  connect(3, {sa_family=AF_INET, sin_port=htons(36635), sin_addr=inet_addr("127.0.0.1")}, 16) = -1 EINPROGRESS (Operation now in progress)
6331  sendto(3, "POST /v1/runtime/acquire-task HTTP/1.1\r\nHost: 127.0.0.1:36635\r\nAccept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\nUser-Agent: python-httpx/0.28.1\r\ncontent-type: application/protobuf\r\naccept: appl"..., 327, 0, NULL, 0) = 327
6828  sendto(3, [{nlmsg_len=20, nlmsg_type=RTM_GETADDR, nlmsg_flags=NLM_F_REQUEST|NLM_F_DUMP, nlmsg_seq=1796172289, nlmsg_pid=0}, {ifa_family=AF_UNSPEC, ...}], 20, 0, {sa_family=AF_NETLINK, nl_pid=0, nl_groups=00000000}, 12) = 20
6828  connect(8, {sa_family=AF_UNIX, sun_path="/tmp/ray/session_2026-12-02_00-44-49_140243_6828/sockets/raylet"}, 65) = 0
"""


def test_the_telemetry_lookup_of_a_hand_started_site_is_reported_with_its_program():
    problems = find_egress(LAUNCH + TELEMETRY_LOOKUP + CONSORTIUM_TRAFFIC, CONSORTIUM, SITE)
    assert len(problems) == 1, problems
    assert problems[0].startswith("DNS query to 10.255.255.53:53, by /work/wt-egress/.venv/bin/fedgen site start")


def test_traffic_inside_the_consortium_passes():
    # Loopback to the consortium's ports, data on connected sockets, netlink, a Unix socket,
    # and an nscd connect that found no daemon (glibc then resolves in-process).
    nscd_absent = TELEMETRY_LOOKUP.splitlines()[1]
    assert find_egress(LAUNCH + CONSORTIUM_TRAFFIC + nscd_absent, CONSORTIUM, SITE) == []


def test_dns_to_a_local_stub_resolver_is_a_lookup():
    sent = r'17198 sendto(3, "\0224\1\0\0\1\0\0\0\0\0\0\7example\3org\0\0\1\0\1", 29, 0, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("127.0.0.53")}, 16) = 29'
    problems = find_egress(LAUNCH + sent, EgressPolicy(loopback_ports=None), SITE)
    assert len(problems) == 1 and problems[0].startswith("DNS query to 127.0.0.53:53")


def test_a_loopback_port_that_is_not_the_consortiums_is_reported():
    stray = '6199  connect(6, {sa_family=AF_INET, sin_port=htons(1), sin_addr=inet_addr("127.0.0.1")}, 16) = -1 ECONNREFUSED (Connection refused)'
    problems = find_egress(LAUNCH + stray, CONSORTIUM, SITE)
    assert len(problems) == 1 and "loopback port 1, not one of the consortium's" in problems[0]
    assert find_egress(LAUNCH + stray, EgressPolicy(loopback_ports=None), SITE) == []


def test_this_machines_own_address_is_not_loopback_but_ipv6_loopback_is():
    # Ray's dual-stack sockets: to this machine's address before the fix, to loopback after.
    own_address = r'7007  connect(19, {sa_family=AF_INET6, sin6_port=htons(37801), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "::ffff:192.0.2.2", &sin6_addr), sin6_scope_id=0}, 28) = -1 EINPROGRESS (Operation now in progress)'
    mapped_loopback = r'15773 connect(7, {sa_family=AF_INET6, sin6_port=htons(46673), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "::ffff:127.0.0.1", &sin6_addr), sin6_scope_id=0}, 28) = -1 EINPROGRESS (Operation now in progress)'
    local = r'17198 sendto(4, "x", 1, 0, {sa_family=AF_INET6, sin6_port=htons(9), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "::1", &sin6_addr), sin6_scope_id=0}, 28) = 1'
    anywhere = EgressPolicy(loopback_ports=None)
    problems = find_egress(LAUNCH + own_address, anywhere, SITE)
    assert len(problems) == 1 and "[::ffff:192.0.2.2]:37801 (not loopback)" in problems[0]
    assert find_egress(LAUNCH + mapped_loopback + "\n" + local, anywhere, SITE) == []


def test_the_destination_of_sendmsg_is_read():
    sent = r'17198 sendmsg(3, {msg_name={sa_family=AF_INET, sin_port=htons(9), sin_addr=inet_addr("127.0.0.1")}, msg_namelen=16, msg_iov=[{iov_base="hello", iov_len=5}], msg_iovlen=1, msg_controllen=0, msg_flags=0}, 0) = 5'
    destinations = parse_trace(sent).destinations
    assert [(d.syscall, d.address, d.port) for d in destinations] == [("sendmsg", "127.0.0.1", 9)]


def test_an_address_written_in_the_data_sent_is_not_a_destination():
    sent = r'17198 sendto(3, "{sa_family=AF_INET, sin_port=htons(443), sin_addr=inet_addr(\"93.184.215.14\")}", 77, 0, {sa_family=AF_INET, sin_port=htons(9), sin_addr=inet_addr("127.0.0.1")}, 16) = 77'
    assert [(d.address, d.port) for d in parse_trace(sent).destinations] == [("127.0.0.1", 9)]


def test_a_resolver_daemon_that_answers_is_a_lookup():
    # The nscd connect above, with the result it has where nscd runs.
    answered = TELEMETRY_LOOKUP.splitlines()[1].replace("= -1 ENOENT (No such file or directory)", "= 0")
    problems = find_egress(LAUNCH + answered, CONSORTIUM, SITE)
    assert len(problems) == 1 and problems[0].startswith("name lookup through nscd (/var/run/nscd/socket)")


@pytest.mark.parametrize(("result", "lookups"), [("= 0", 1), ("= -1 ENOENT (No such file or directory)", 0)])
def test_the_result_of_an_interrupted_connect_is_paired_with_it(result, lookups):
    started = '6323  connect(3, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110 <unfinished ...>\n'
    other = '6199  connect(13, {sa_family=AF_INET, sin_port=htons(45173), sin_addr=inet_addr("127.0.0.1")}, 16) = 0\n'
    resumed = f"6323  <... connect resumed>)            {result}\n"
    assert len(find_egress(LAUNCH + started + other + resumed, CONSORTIUM, SITE)) == lookups


def test_a_connect_whose_address_strace_could_not_read_fails():
    unreadable = "6199  connect(3, 0x7ffd5c1e2a30, 16) = -1 EFAULT (Bad address)"
    problems = find_egress(LAUNCH + unreadable, CONSORTIUM, SITE)
    assert len(problems) == 1 and problems[0].startswith("connect to an address strace could not read")


def test_a_raw_packet_socket_address_fails():
    raw = '6199  sendto(5, "\\377", 1, 0, {sa_family=AF_PACKET, sll_protocol=htons(ETH_P_ALL), sll_ifindex=if_nametoindex("eth0"), sll_hatype=ARPHRD_NETROM, sll_pkttype=PACKET_HOST, sll_halen=0}, 20) = 1'
    problems = find_egress(LAUNCH + raw, CONSORTIUM, SITE)
    assert len(problems) == 1 and problems[0].startswith("AF_PACKET socket address")


def test_a_trace_that_saw_nothing_fails():
    assert find_egress("", CONSORTIUM, SITE) == ["the trace is empty: strace did not run or wrote elsewhere"]
    launch_only = LAUNCH.splitlines()[1]
    assert find_egress(launch_only, CONSORTIUM, SITE) == [
        "no socket address was traced at all: the trace saw no network calls"
    ]
    other_program = LAUNCH.replace('"site", "start"', '"aggregator", "start"')
    assert find_egress(other_program, CONSORTIUM, SITE) == [f"{SITE!r} never started under the trace"]


def test_a_failed_execve_is_not_the_program_that_runs():
    # A shim runs, then its shell looks for bash along PATH: the first try fails.
    lines = r"""
17198 execve("/root/.pyenv/shims/python3", ["python3", "gen.py"], 0x7ffe5f71ee38 /* 35 vars */) = 0
17198 execve("/root/.cargo/bin/bash", ["bash", "/root/.pyenv/shims/python3", "gen.py"], 0x7ffeb50b33b0 /* 35 vars */) = -1 ENOENT (No such file or directory)
17198 clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD, child_tidptr=0x7f36630f1a10) = 17199
"""
    trace = parse_trace(lines)
    assert trace.programs == {17198: "python3 gen.py"}
    assert trace.program_of(17199) == "python3 gen.py"


def test_strace_as_the_launchers_run_it_sees_a_dns_query(tmp_path):
    """Live: strace works here (ptrace allowed) and the command line writes what the parser reads."""
    program = (
        "import socket\n"
        "probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "probe.sendto(b'lookup', ('127.0.0.53', 53))\n"
    )
    log = tmp_path / "probe.strace"
    subprocess.run([*strace_command(log), sys.executable, "-c", program], check=True, timeout=60)
    problems = find_egress(log.read_text(), EgressPolicy(loopback_ports=None), "socket.SOCK_DGRAM")
    assert len(problems) == 1 and problems[0].startswith("DNS query to 127.0.0.53:53, by ")
