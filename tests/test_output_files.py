"""Every `-o` goes through flux_npu.utils.output: regular files are written atomically, a device, a
FIFO or a path through /dev/stdout is written in place and never replaced, a directory is refused
with a message naming it (issue 18 item 1)."""

import json
import os
import stat
import subprocess
import sys
import threading

import pytest

from flux_npu.cli import main
from flux_npu.utils.output import OutputError, output_kind, write_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FifoReader:
    """A FIFO in tmp_path with a thread reading everything written to it."""

    def __init__(self, path):
        self.path = str(path)
        os.mkfifo(self.path)
        self.data = b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        with open(self.path, "rb") as f:
            self.data = f.read()

    def result(self):
        self.thread.join(60)
        assert not self.thread.is_alive(), "nothing closed the FIFO"
        assert stat.S_ISFIFO(os.lstat(self.path).st_mode), "the FIFO was replaced by another file"
        return self.data


def test_regular_file_is_replaced_atomically_keeping_its_mode(tmp_path):
    p = tmp_path / "out.json"
    p.write_text("old")
    os.chmod(p, 0o640)
    assert write_output(str(p), "new") == "file"
    assert p.read_text() == "new"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["out.json"]  # no temporary left behind


def test_new_file_gets_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_output(str(tmp_path / "n.json"), "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "n.json").st_mode) == 0o644


def test_symlink_to_a_regular_file_stays_a_symlink(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_output(str(link), "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_fifo_and_symlink_to_fifo_are_written_in_place(tmp_path):
    for name, via_link in (("f1", False), ("f2", True)):
        r = FifoReader(tmp_path / name)
        path = r.path
        if via_link:
            path = str(tmp_path / (name + ".lnk"))
            os.symlink(r.path, path)
        assert output_kind(path) == "stream"
        write_output(path, "hello")
        assert r.result() == b"hello"


def test_character_device_is_a_stream_and_is_kept():
    assert output_kind("/dev/null") == "stream"
    write_output("/dev/null", "discarded")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_directory_socket_and_missing_parent_are_refused(tmp_path):
    with pytest.raises(OutputError, match="is a directory"):
        write_output(str(tmp_path), "x")
    with pytest.raises(OutputError, match="does not exist"):
        write_output(str(tmp_path / "no" / "x.json"), "x")
    import socket

    sock_path = str(tmp_path / "s.sock")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(sock_path)
        with pytest.raises(OutputError, match="socket"):
            write_output(sock_path, "x")
    finally:
        s.close()


def test_dev_stdout_onto_a_redirected_file_appends_and_keeps_the_file(tmp_path):
    """`flux-npu info -o /dev/stdout > f`: the shell's file must receive everything, in order."""
    out = tmp_path / "captured.txt"
    code = ("import sys; print('before', flush=True); from flux_npu.utils.output import write_output; "
            "write_output('/dev/stdout', 'middle\\n'); print('after', flush=True)")
    with open(out, "w") as f:
        subprocess.run([sys.executable, "-c", code], stdout=f, check=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert out.read_text() == "before\nmiddle\nafter\n"


def test_ds_config_into_a_fifo(tmp_path):
    r = FifoReader(tmp_path / "ds.fifo")
    rc = main(["ds-config", os.path.join(ROOT, "configs", "ds_zero2_bf16_full.json"), "--backend", "cpu",
               "-o", r.path])
    assert rc == 0
    assert "zero_optimization" in json.loads(r.result())


def test_ds_config_onto_a_directory_is_refused(tmp_path, capsys):
    rc = main(["ds-config", os.path.join(ROOT, "configs", "ds_zero2_bf16_full.json"), "--backend", "cpu",
               "-o", str(tmp_path)])
    assert rc == 1 and "is a directory" in capsys.readouterr().err


def test_info_into_a_fifo(tmp_path):
    r = FifoReader(tmp_path / "info.fifo")
    assert main(["info", "--backend", "cpu", "-o", r.path]) == 0
    assert "backends" in json.loads(r.result())


def test_parity_record_and_check_into_fifos(tmp_path):
    r = FifoReader(tmp_path / "golden.fifo")
    assert main(["parity", "record", "--backend", "cpu", "--shapes", "tiny", "--dtypes", "fp32",
                 "--cases", "rms_norm", "-o", r.path]) == 0
    golden = tmp_path / "g.safetensors"
    golden.write_bytes(r.result())
    r2 = FifoReader(tmp_path / "check.fifo")
    assert main(["parity", "check", str(golden), "--backend", "cpu", "-o", r2.path]) == 0
    assert json.loads(r2.result())["ok"] is True


def test_bench_ops_into_a_fifo(tmp_path):
    r = FifoReader(tmp_path / "ops.fifo")
    assert main(["bench", "ops", "--quick", "--ops", "gated_residual", "--dtypes", "fp32", "--repeats", "1",
                 "--warmup", "0", "--no-progress", "-o", r.path]) == 0
    assert "rows" in json.loads(r.result())


def test_bench_model_into_a_fifo_gets_the_final_json_once_and_no_log_beside_it(tmp_path):
    r = FifoReader(tmp_path / "model.fifo")
    assert main(["bench", "model", "--preset", "tiny", "--mode", "infer", "--res", "64", "--steps", "1",
                 "--repeats", "1", "--warmup", "0", "--no-progress", "-o", r.path]) == 0
    data = json.loads(r.result())  # one document: rows are not streamed into a FIFO
    assert data["meta"]["complete"] is True
    assert sorted(os.listdir(tmp_path)) == ["model.fifo"]
