"""translate_env: CUDA/NCCL launch variables -> HCCL/Ascend ones, reported where none exists."""

import os
import re

import pytest

from flux_npu.distributed import translate_env

FLUXKITS_ENV = os.path.join(os.path.dirname(__file__), "data", "ds_configs", "fluxkits_train_lora_env.sh")


def load_exports(path):
    env = {}
    for line in open(path):
        m = re.match(r"export (\w+)=(.*)$", line.strip())
        if m:
            env[m.group(1)] = m.group(2)
    return env


def rows_by_var(rows):
    return {r[0]: r for r in rows}


def test_fluxkits_launch_env_on_npu():
    env = load_exports(FLUXKITS_ENV)
    assert len(env) == 17
    add, rows = translate_env(env, "npu")
    assert add == {"DS_ACCELERATOR": "npu", "HCCL_SOCKET_IFNAME": "eth1"}
    r = rows_by_var(rows)
    assert r["NCCL_SOCKET_IFNAME"][2:] == ("translated", "HCCL_SOCKET_IFNAME=eth1")
    assert r["GLOO_SOCKET_IFNAME"][2] == "kept"
    no_eq = sorted(v for v, row in r.items() if row[2] == "no-equivalent")
    assert no_eq == sorted(k for k in env if k not in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"))
    assert all(v in r for v in env), "every variable is reported"


def test_direct_translations_and_units():
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
           "CUDA_LAUNCH_BLOCKING": "1", "NCCL_BUFFSIZE": str(8 * 1024 * 1024), "NCCL_DEBUG": "INFO",
           "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    add, _ = translate_env(env, "npu")
    assert add == {"DS_ACCELERATOR": "npu", "ASCEND_RT_VISIBLE_DEVICES": "0,1",
                   "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True", "ASCEND_LAUNCH_BLOCKING": "1",
                   "HCCL_BUFFSIZE": "8", "ASCEND_GLOBAL_LOG_LEVEL": "1", "HCCL_ASYNC_ERROR_HANDLING": "1"}


def test_ascend_variable_already_set_wins():
    add, rows = translate_env({"CUDA_VISIBLE_DEVICES": "0,1", "ASCEND_RT_VISIBLE_DEVICES": "4,5"}, "npu")
    assert "ASCEND_RT_VISIBLE_DEVICES" not in add
    row = rows_by_var(rows)["CUDA_VISIBLE_DEVICES"]
    assert row[2] == "kept" and "4,5" in row[3]


def test_hccl_timeouts_checked():
    _, rows = translate_env({"HCCL_EXEC_TIMEOUT": "1000"}, "npu")
    assert rows_by_var(rows)["HCCL_EXEC_TIMEOUT"][3].endswith("952")
    with pytest.raises(ValueError, match="120..7200"):
        translate_env({"HCCL_CONNECT_TIMEOUT": "60"}, "npu")
    with pytest.raises(ValueError, match="whole number"):
        translate_env({"HCCL_EXEC_TIMEOUT": "soon"}, "npu")


def test_other_backends_only_pin_deepspeed_accelerator():
    env = load_exports(FLUXKITS_ENV)
    assert translate_env(env, "cpu")[0] == {"DS_ACCELERATOR": "cpu"}
    assert translate_env(env, "cuda")[0] == {"DS_ACCELERATOR": "cuda"}
    assert translate_env({"DS_ACCELERATOR": "cuda"}, "cuda")[0] == {}
    with pytest.raises(ValueError, match="contradicts"):
        translate_env({"DS_ACCELERATOR": "cuda"}, "npu")
