"""ds-config against hostile or mistaken inputs (issue 12, items 2 and 5): never writes onto its input
or over a file that is not a DeepSpeed config, reads YAML without anchors/aliases (a 342-byte alias
bomb is refused at once, under a memory cap), and turns non-finite numbers, lists where mappings
belong and malformed files into one clear error instead of a traceback or non-JSON output."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from flux_npu.cli import main
from flux_npu.distributed import DeepSpeedConfigError, rewrite

HERE = os.path.dirname(__file__)
HF_ZERO2 = os.path.join(HERE, "data", "ds_configs", "hf_zero2_offload.json")
FLUXKITS = os.path.join(HERE, "data", "ds_configs", "fluxkits_lora.yaml")

# The classic "billion laughs" in YAML: nine levels of nine aliases, 342 bytes, 9**9 strings expanded.
_LOL = ",".join(['"lol"'] * 9)
ALIAS_BOMB = "".join(f"{name}: &{name} [{','.join([f'*{prev}'] * 9) if prev else _LOL}]\n"
                     for prev, name in zip([None, *"abcdefgh"], "abcdefghi", strict=True))


def run_cli(capsys, *args):
    rc = main(["ds-config", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_alias_bomb_is_refused_quickly_under_a_memory_cap(tmp_path):
    assert len(ALIAS_BOMB.encode()) == 342
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    # A fresh interpreter: cap the address space at what it already maps + 512 MiB, so the old loader
    # (5.5 GB for this file) dies of MemoryError while a refusal costs nothing.
    code = textwrap.dedent(f"""
        import resource
        from flux_npu.distributed import DeepSpeedConfigError
        from flux_npu.distributed.dsconfig import load_config
        vm = [int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmSize')][0]
        resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))
        try:
            load_config({str(bomb)!r})
        except DeepSpeedConfigError as exc:
            print('REFUSED:', exc)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "REFUSED:" in r.stdout and "anchors and aliases" in r.stdout and "line 1" in r.stdout


def test_cli_on_bad_files_gives_one_clear_error(tmp_path, capsys):
    cases = {
        "bomb.yaml": (ALIAS_BOMB, "anchors and aliases"),
        "nan.yaml": ("zero_optimization:\n  stage: 2\ngradient_clipping: .nan\n", "gradient_clipping = nan"),
        "huge.yaml": ("zero_optimization:\n  stage: 2\n  reduce_bucket_size: 1e400\n",
                      "zero_optimization.reduce_bucket_size = inf"),
        "nan.json": ('{"zero_optimization": {"stage": 2}, "gradient_clipping": NaN}', "NaN is not a number"),
        "inf.json": ('{"zero_optimization": {"stage": 2}, "gradient_clipping": 1e400}', "not a finite number"),
        "list.yaml": ("zero_optimization: [1, 2]\n", "zero_optimization in"),
        "offload.json": ('{"zero_optimization": {"stage": 2, "offload_optimizer": ["cpu"]}}',
                         "zero_optimization.offload_optimizer in"),
        "bf16.yaml": ("bf16: true\nzero_optimization: {stage: 2}\n", "bf16 in"),
        "section.yaml": ("mixed_precision: bf16\ndeepspeed: [stage, 2]\n", "deepspeed: in"),
        "broken.yaml": ("zero_optimization: {stage: 2\n  bad: [\n", "is not valid YAML"),
        "broken.json": ('{"zero_optimization": ', "is not valid JSON"),
        "top.json": ("[1, 2]", "must hold a mapping"),
        "interp.yaml": ("a0: xxxxxxxxxx\n" + "".join(f"a{i}: ${{a{i - 1}}}${{a{i - 1}}}\n" for i in range(1, 31)),
                        "longer than 4096"),
        "cycle.yaml": ("a: ${b}\nb: ${a}\n", "circular"),
        "duplicate.yaml": ("zero_optimization:\n  stage: 2\n  stage: 3\n", "duplicate key 'stage'"),
    }
    for name, (text, expect) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        out = tmp_path / (name + ".out.json")
        rc, stdout, stderr = run_cli(capsys, str(path), "--backend", "cpu", "-o", str(out))
        assert rc == 1, (name, stdout, stderr)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert lines and lines[0].startswith("flux-npu ds-config: error:"), (name, stderr)
        assert expect in stderr and "Traceback" not in stderr, (name, stderr)
        assert not out.exists(), name  # nothing half-written


def test_interpolated_yaml_matches_the_written_out_one(tmp_path):
    # training YAMLs use OmegaConf ${...} references; OmegaConf resolves them, one value at a time (bounded)
    ref = tmp_path / "ref.yaml"
    ref.write_text("zero_optimization:\n  stage: 2\n  reduce_bucket_size: 2e8\ngradient_accumulation_steps: 4\n"
                   "train_micro_batch_size_per_gpu: 1\n")
    interp = tmp_path / "interp.yaml"
    interp.write_text("zero_optimization:\n  stage: 2\n  reduce_bucket_size: ${zero_optimization.size}\n"
                      "  size: 2e8\ngradient_accumulation_steps: ${zero_optimization.stage}\n"
                      "train_micro_batch_size_per_gpu: 1\n")
    a = rewrite(str(ref), "cpu", validate_result=False).config
    b = rewrite(str(interp), "cpu", validate_result=False).config
    assert b["zero_optimization"]["reduce_bucket_size"] == a["zero_optimization"]["reduce_bucket_size"] == 200_000_000
    assert b["gradient_accumulation_steps"] == 2


def test_interpolation_without_omegaconf_names_the_install(tmp_path, monkeypatch):
    # ${...} is resolved by OmegaConf (the [deepspeed] extra); without it the error says so and names the key
    monkeypatch.setitem(sys.modules, "omegaconf", None)  # `import omegaconf` now raises ImportError
    path = tmp_path / "interp.yaml"
    path.write_text("zero_optimization:\n  stage: 2\n  size: 2e8\n  reduce_bucket_size: ${zero_optimization.size}\n")
    with pytest.raises(DeepSpeedConfigError, match=r"pip install omegaconf") as err:
        rewrite(str(path), "cpu", validate_result=False)
    assert "zero_optimization.reduce_bucket_size" in str(err.value) and str(path) in str(err.value)
    plain = tmp_path / "plain.yaml"  # a config without ${...} does not need OmegaConf
    plain.write_text("zero_optimization:\n  stage: 2\n  reduce_bucket_size: 2e8\n")
    assert rewrite(str(plain), "cpu", validate_result=False).config["zero_optimization"]["reduce_bucket_size"] == 2e8


def test_nan_in_a_dict_config_is_refused():
    with pytest.raises(DeepSpeedConfigError, match="not a finite number"):
        rewrite({"zero_optimization": {"stage": 2}, "gradient_clipping": float("nan")}, "cpu")


def test_refuses_to_write_onto_its_input(tmp_path, capsys):
    yaml_in = tmp_path / "train.yaml"
    yaml_in.write_text(open(FLUXKITS).read())
    before = yaml_in.read_bytes()
    json_in = tmp_path / "ds.json"
    json_in.write_text(open(HF_ZERO2).read())
    json_before = json_in.read_bytes()
    (tmp_path / "link.yaml").symlink_to(yaml_in)
    os.link(json_in, tmp_path / "hard.json")
    os.makedirs(tmp_path / "sub")
    for src, dst in [(yaml_in, yaml_in), (json_in, json_in), (yaml_in, tmp_path / "link.yaml"),
                     (json_in, tmp_path / "hard.json"), (json_in, tmp_path / "sub" / ".." / "ds.json")]:
        rc, _, err = run_cli(capsys, str(src), "--backend", "npu", "-o", str(dst))
        assert rc == 1 and "is the input file" in err and "another output path" in err, (src, dst, err)
        # --force does not allow it either: it would destroy the input
        rc, _, err = run_cli(capsys, str(src), "--backend", "npu", "-o", str(dst), "--force")
        assert rc == 1 and "is the input file" in err
    assert yaml_in.read_bytes() == before and json_in.read_bytes() == json_before


def test_overwrites_only_a_deepspeed_json_unless_forced(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    other_json = tmp_path / "package.json"
    other_json.write_text('{"name": "x"}')
    for target in (notes, other_json):
        before = target.read_bytes()
        rc, _, err = run_cli(capsys, HF_ZERO2, "--backend", "npu", "-o", str(target))
        assert rc == 1 and "not a DeepSpeed JSON config" in err and "--force" in err
        assert target.read_bytes() == before
    rc, _, err = run_cli(capsys, HF_ZERO2, "--backend", "npu", "-o", str(notes), "--force")
    assert rc == 0, err
    assert json.loads(notes.read_text()) == rewrite(HF_ZERO2, "npu").config
    # a previous output (a DeepSpeed JSON) is replaced without --force
    out = tmp_path / "out.json"
    assert run_cli(capsys, HF_ZERO2, "--backend", "npu", "-o", str(out))[0] == 0
    assert run_cli(capsys, HF_ZERO2, "--backend", "cpu", "-o", str(out))[0] == 0
    assert json.loads(out.read_text()) == rewrite(HF_ZERO2, "cpu").config
    rc, _, err = run_cli(capsys, HF_ZERO2, "--backend", "cpu", "-o", str(tmp_path / "missing" / "x.json"))
    assert rc == 1 and "does not exist" in err


def test_unknown_backend_names_the_known_ones(capsys):
    rc, _, err = run_cli(capsys, HF_ZERO2, "--backend", "tpu")
    assert rc == 1 and "unknown backend 'tpu'" in err and "npu" in err and "cpu" in err
