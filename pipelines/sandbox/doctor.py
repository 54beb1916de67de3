"""`rewardranker sandbox doctor`: which isolation layers really work on this host.

The host-side facts come from the same probe the runner uses; the in-sandbox
facts come from a Python program run through the sandbox itself, so a layer
is reported active only when a candidate would actually meet it.
"""

import json
from dataclasses import dataclass

from pipelines.sandbox import isolation
from pipelines.sandbox.cgroup import GROUP_PREFIX
from pipelines.sandbox.job import Limits
from pipelines.sandbox.runner import run_one

_INSIDE_PROBE = r"""
import json, os, resource, socket, sys
def readable(path):
    try:
        open(path, "rb").close()
        return True
    except OSError:
        return False
def writable(folder):
    try:
        open(os.path.join(folder, ".rr-probe"), "w").close()
        os.unlink(os.path.join(folder, ".rr-probe"))
        return True
    except OSError:
        return False
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines()
              if ":\t" in line)
interfaces = [line.split(":")[0].strip() for line in open("/proc/net/dev").read().splitlines()[2:]]
tmp = os.statvfs("/tmp")
print(json.dumps({
    "uid": os.getuid(),
    "seccomp": status.get("Seccomp", "").strip(),
    "no_new_privs": status.get("NoNewPrivs", "").strip(),
    "cap_eff": status.get("CapEff", "").strip(),
    "interfaces": interfaces,
    "visible_pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "hostname": socket.gethostname(),
    "root_entries": sorted(os.listdir("/")),
    "usr_writable": writable("/usr"),
    "etc_writable": writable("/etc"),
    "host_paths_visible": [
        p for p in ("/work", "/root", "/home", "/var", "/run") if os.path.exists(p)
    ],
    "tmp_bytes": tmp.f_blocks * tmp.f_frsize,
    "env": sorted(os.environ),
    "cgroups": open("/proc/self/cgroup").read(),
    "rlimit_core": resource.getrlimit(resource.RLIMIT_CORE)[0],
    "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    "rlimit_fsize": resource.getrlimit(resource.RLIMIT_FSIZE)[0],
    "rlimit_cpu": resource.getrlimit(resource.RLIMIT_CPU)[0],
}))
"""


@dataclass(frozen=True)
class Layer:
    name: str
    active: bool
    detail: str


def diagnose() -> list[Layer]:
    """Every isolation layer, probed from outside and from inside a sandboxed run."""
    host = isolation.probe_host()
    layers = [
        Layer(
            "unprivileged user",
            host.uid != 0,
            f"runs as uid {host.uid}" + (" (dropped from root)" if host.switch_user else ""),
        ),
        Layer("bubblewrap", host.isolated, host.bwrap or host.bwrap_error),
    ]
    if not host.isolated:
        insecure = isolation.insecure_allowed()
        layers.append(
            Layer(
                "refuses without isolation",
                not insecure,
                "RR_SANDBOX_INSECURE=1 is set: candidates run UNISOLATED"
                if insecure
                else "set RR_SANDBOX_INSECURE=1 to run candidates unisolated",
            )
        )
        if not insecure:
            return layers
    result = run_one("python", _INSIDE_PROBE, "", limits=Limits(timeout_s=20))
    try:
        inside = json.loads(result.stdout_tail.strip().splitlines()[0])
    except (IndexError, ValueError):
        layers.append(Layer("probe run", False, f"{result.verdict}: {result.stderr_tail[-300:]}"))
        return layers
    return layers + _inside_layers(host, inside)


def _inside_layers(host: isolation.Host, inside: dict) -> list[Layer]:
    cgroups = inside["cgroups"]
    in_group = {
        kind: any(kind in line and GROUP_PREFIX in line for line in cgroups.splitlines())
        for kind in ("memory", "pids")
    }
    if host.cgroup_version == 2:
        in_group = dict.fromkeys(in_group, f"0::/{GROUP_PREFIX}" in cgroups)
    expected_root = {"bin", "dev", "etc", "job", "lib", "lib64", "proc", "src", "tmp", "usr"}
    extra_root = set(inside["root_entries"]) - expected_root - {"sbin", "lib32", "libx32", "rr"}
    return [
        Layer("user namespace", inside["uid"] != 0, f"uid {inside['uid']} inside"),
        Layer("no capabilities", int(inside["cap_eff"] or "1", 16) == 0, inside["cap_eff"]),
        Layer("network namespace", inside["interfaces"] == ["lo"], f"{inside['interfaces']}"),
        Layer(
            "pid namespace",
            max(inside["visible_pids"]) < 100,
            f"{len(inside['visible_pids'])} processes visible",
        ),
        Layer("ipc+uts namespaces", inside["hostname"] == "sandbox", inside["hostname"]),
        Layer(
            "read-only minimal root",
            not (inside["usr_writable"] or inside["etc_writable"] or extra_root)
            and not inside["host_paths_visible"],
            f"/ = {' '.join(inside['root_entries'])}",
        ),
        Layer("private capped /tmp", inside["tmp_bytes"] <= 1 << 30, f"{inside['tmp_bytes']} B"),
        Layer(
            "cleared environment",
            not any(name.startswith("RR_") for name in inside["env"]),
            " ".join(inside["env"]),
        ),
        Layer(
            "seccomp filter",
            inside["seccomp"] == "2" and inside["no_new_privs"] == "1",
            f"Seccomp: {inside['seccomp']}",
        ),
        Layer("cgroup memory limit", in_group["memory"], f"cgroup v{host.cgroup_version}"),
        Layer("cgroup pids limit", in_group["pids"], f"cgroup v{host.cgroup_version}"),
        Layer(
            "rlimits",
            inside["rlimit_core"] == 0 and inside["rlimit_cpu"] > 0 and inside["rlimit_fsize"] > 0,
            f"core={inside['rlimit_core']} cpu={inside['rlimit_cpu']}s "
            f"fsize={inside['rlimit_fsize']} nofile={inside['rlimit_nofile']}",
        ),
    ]
