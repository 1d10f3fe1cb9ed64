"""The layout rules of issue 16: one home per op, one shape table, small modules, no import circle
between backends/ and ops/. Each test reads the tree or the catalogue; none runs a kernel."""

import ast
import contextlib
import os

import pytest
import torch

import flux_npu
from flux_npu import models, ops, shapes
from flux_npu.ops import catalogue, reference, registry

ROOT = os.path.dirname(flux_npu.__file__)
TESTS = os.path.dirname(__file__)
MAX_LINES = 500


def _modules():
    for d, _dirs, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                yield os.path.relpath(path, ROOT).replace(os.sep, "/"), path


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _imports(path, package):
    """Every module an import statement in `path` names (module level or inside functions)."""
    tree = ast.parse(_read(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_no_module_over_500_lines():
    over = {rel: n for rel, path in _modules() if (n := len(_read(path).splitlines())) > MAX_LINES}
    assert not over, over


def test_backends_never_import_ops_or_kernels():
    """The op table depends on the backends, never the other way (no import circle)."""
    bad = {}
    for rel, path in _modules():
        if rel.startswith("backends/"):
            package = "flux_npu." + os.path.dirname(rel).replace("/", ".")
            names = {m for m in _imports(path, package) if m.startswith(("flux_npu.ops", "flux_npu.kernels"))}
            if names:
                bad[rel] = sorted(names)
    assert not bad, bad


def test_catalogue_imports_no_backend_or_kernel_at_import_time():
    for rel, path in _modules():
        if rel.startswith("ops/catalogue/"):
            tree = ast.parse(_read(path))
            top = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
            assert not [n.module for n in top if n.module and n.module.split(".")[0] in ("backends", "kernels")
                        or (n.level >= 3)], rel


def test_every_op_list_is_the_catalogue():
    from flux_npu.benchmark import ops as bench_ops
    from flux_npu.parity import CASES
    from flux_npu.patches.spec import OP_NAMES

    assert registry.OPS == ops.OPS == catalogue.OPS
    assert OP_NAMES == catalogue.SWITCHABLE == tuple(n for n in catalogue.OPS if catalogue.info(n).switchable)
    assert set(bench_ops.OPS) == set(catalogue.BENCH)
    for op in catalogue.OPS:
        info = catalogue.info(op)
        assert callable(getattr(ops, op)) and getattr(reference, op) is info.ref or info.bound, op
        assert {c.op for c in CASES.values()} >= {op}, f"no parity case for {op}"
        assert any(b[0] is info for b in catalogue.BENCH.values()), f"no benchmark for {op}"
        assert os.path.exists(os.path.join(TESTS, "ops", f"test_{op}.py")), f"no tests/ops/test_{op}.py"
        assert set(info.grads) <= set(info.arg_names), op


@pytest.mark.parametrize("op", catalogue.OPS)
@pytest.mark.parametrize("shape", list(shapes.SHAPES))
def test_sample_inputs_pass_validation_and_count_bytes(op, shape):
    """Every op's samples at every named shape are valid calls (meta tensors: nothing allocated)."""
    info = catalogue.info(op)
    args = info.sample_inputs(shapes.SHAPES[shape], torch.bfloat16)
    assert info.validate(*args) is None
    assert info.nbytes(*args) > 0
    hash(info.key(("cpu",), *args))


@pytest.mark.parametrize("op", catalogue.OPS)
def test_extra_samples_pass_validation(op):
    """The catalogue's extra samples (run by tests/ops) are valid calls too (meta tensors)."""
    info = catalogue.info(op)
    for name, make in info.extra_samples.items():
        args = make(torch.bfloat16)
        assert info.validate(*args) is None, name
        assert info.nbytes(*args) > 0, name
        with contextlib.suppress(TypeError):  # an additive attention mask has no plan key: decided per call
            hash(info.key(("cpu",), *args))


def test_model_presets_read_the_shape_table():
    for name in ("tiny", "flux-mini", "flux-dev"):
        cfg, s = models.PRESETS[name], shapes.SHAPES[name]
        assert (cfg["num_attention_heads"], cfg["attention_head_dim"], tuple(cfg["axes_dims_rope"])) == (
            s.heads, s.head_dim, s.axes), name
        assert s.heads * s.head_dim == s.block_dim and sum(s.axes) == s.head_dim


def test_reference_means_plain_torch_only():
    """No op's fallback runs a backend's kernels: the references import no kernel and no dispatch."""
    for rel, path in _modules():
        if rel.startswith("ops/catalogue/"):
            text = _read(path)
            refs = [n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name in catalogue.OPS]
            for fn in refs:
                body = ast.get_source_segment(text, fn)
                assert "ops." not in body and "backend" not in body.split('"""')[-1], (rel, fn.name)


def test_kernel_files_are_named_after_their_op_and_all_registered():
    """kernels/<backend>/<op>.py: every kernel file is named after a catalogue op (npu's
    infer_attention is a second attention kernel, imported first for its priority), and importing
    the package registers each file's op on that backend."""
    from flux_npu.backends import cpu, cuda, npu

    records = {"cpu": cpu.BACKEND, "cuda": cuda.BACKEND, "npu": npu.BACKEND}
    extra = {("npu", "infer_attention")}
    for backend in ("cpu", "cuda", "npu"):
        names = {f[:-3] for f in os.listdir(os.path.join(ROOT, "kernels", backend))
                 if f.endswith(".py") and not f.startswith("_")}
        assert names - set(catalogue.OPS) == {n for b, n in extra if b == backend}, backend
        for op in names & set(catalogue.OPS):
            assert registry.kernels_for(op, records[backend]), (backend, op)
