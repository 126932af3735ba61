"""A failed grid point's CSV cell names the root cause from vLLM's log, not its last line."""

from __future__ import annotations

from serving.server import VLLMStartError
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
