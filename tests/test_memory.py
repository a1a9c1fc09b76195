"""What vaelab counts as free memory: the least of the host's, the container's and the address-space limit."""

import subprocess
import sys
import textwrap

from vaelab import memory

GiB = 2**30


def fake_machine(tmp_path, meminfo_gib=20, cgroup=None):
    proc, groups = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    groups.mkdir()
    (proc / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable:   {meminfo_gib * 2**20} kB\n")
    (proc / "self" / "status").write_text("Name: python\nVmSize:\t 1000 kB\n")
    for name, text in (cgroup or {}).items():
        (groups / name).parent.mkdir(parents=True, exist_ok=True)
        (groups / name).write_text(text)
    return proc, groups


def test_without_a_container_limit_the_host_s_memory_counts(tmp_path):
    assert memory.cpu_free(*fake_machine(tmp_path)) == 20 * GiB
    v1_unlimited = {"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "5\n"}
    assert memory.cpu_free(*fake_machine(tmp_path / "v1", cgroup=v1_unlimited)) == 20 * GiB
    v2_unlimited = {"memory.max": "max\n", "memory.current": "5\n"}
    assert memory.cpu_free(*fake_machine(tmp_path / "v2", cgroup=v2_unlimited)) == 20 * GiB


def test_a_cgroup_v2_limit_below_the_host_s_counts_less_its_use_but_not_its_page_cache(tmp_path):
    cgroup = {"memory.max": f"{4 * GiB}\n", "memory.current": f"{3 * GiB}\n", "memory.stat": f"inactive_file {GiB}\n"}
    assert memory.cpu_free(*fake_machine(tmp_path, cgroup=cgroup)) == 2 * GiB


def test_a_cgroup_v1_limit_counts_too(tmp_path):
    cgroup = {"memory/memory.limit_in_bytes": f"{3 * GiB}\n", "memory/memory.usage_in_bytes": f"{GiB}\n"}
    assert memory.cpu_free(*fake_machine(tmp_path, cgroup=cgroup)) == 2 * GiB


def test_an_address_space_limit_refuses_a_batch_in_one_line_before_allocating_it(tmp_path):
    """``ulimit -v`` at 2 GiB above what the process maps: β-TCVAE's (B, B, D) densities for B = 3896 need
    3.5 GiB, so ``train`` must refuse them in one line (it ended in an allocator's traceback)."""
    script = textwrap.dedent(
        """
        import resource, sys
        from pathlib import Path
        import torch
        from vaelab.cli import main
        status = Path('/proc/self/status').read_text().splitlines()
        vm = int(next(line for line in status if line.startswith('VmSize')).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + 2 * 2**30, resource.RLIM_INFINITY))
        sys.exit(main(['train', '--objective', 'tc', '--batch-size', '3896', '--epochs', '1', '--out', sys.argv[1]]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "GiB of memory" in done.stderr and "--batch-size" in done.stderr
    assert not (tmp_path / "run").exists()
