"""``export --plugins all|depthwise|none``: which streaming causal convs become plugin nodes.

Per choice the exported graph holds the expected plugin nodes (domain and op types of
``plugin_nodes``) and plain Convs, and ONNX Runtime decodes it as the torch model does. The old
spelling ``flashvaed`` still means ``all``, in options and in manifests written before.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from test_export import SMALL, contract_decode, perturbed
from typer.testing import CliRunner

from flashvaed.cli import app
from flashvaed.engines import load
from flashvaed.export.contract import read_manifest
from flashvaed.export.onnx_export import ExportOptions, export
from flashvaed.export.plugin_nodes import DENSE, DEPTHWISE, DOMAIN, DOMAIN_VERSION, WEIGHT_PERM
from flashvaed.models import StudentSpec, WanConfig, save_student
from flashvaed.models.blocks import streaming_convs
from flashvaed.models.student import build_student

# (plugin nodes: dense, depthwise), (plain streaming Convs: dense, depthwise), as fractions of the model's
EXPECTED = {
    "all": ((1, 1), (0, 0)),
    "depthwise": ((0, 1), (1, 0)),
    "none": ((0, 0), (1, 1)),
}


@pytest.fixture(scope="module")
def student():
    """flash-wan2.1 at base 16: dense convs (conv_in, time_conv, head) and depthwise ones (stages)."""
    torch.manual_seed(0)  # the same weights whichever tests ran before
    return perturbed(build_student(StudentSpec.load("flash-wan2.1"), WanConfig(base_dim=16))[0])


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory):
    """The student exported once per plugins choice for the module (SMALL's shapes), on demand:
    choice -> (folder, ExportResult)."""
    root = tmp_path_factory.mktemp("exports")
    done = {}

    def get(plugins: str):
        if plugins not in done:
            options = ExportOptions(**{**SMALL.__dict__, "plugins": plugins})
            done[plugins] = root / plugins, export(student, root / plugins, options)
        return done[plugins]

    return get


@pytest.fixture(scope="module")
def reference(student, exported):
    """Latents (a size the graphs were not traced at), the torch frames and ONNX Runtime's frames of
    the plain-ops export: plugin exports must give the latter to float rounding."""
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 6, 3, 5)
    return latents, student.decode(latents).numpy(), contract_decode(exported("none")[0], latents.numpy(), 2)


def graph_counts(path) -> tuple[tuple[int, int], tuple[int, int], onnx.ModelProto]:
    """(plugin nodes: dense, depthwise), (plain Convs with a temporal kernel: dense, depthwise)."""
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    plugins = (sum(n.op_type == DENSE for n in nodes), sum(n.op_type == DEPTHWISE for n in nodes))
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    plain = [0, 0]
    for n in model.graph.node:
        dims = weights.get(n.input[1]) if n.op_type == "Conv" else None
        if dims and len(dims) == 5 and dims[2] > 1:  # (C_out, C/group, kt > 1, kh, kw): a streaming causal conv
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            plain[group != 1] += 1
    return plugins, tuple(plain), model


@pytest.mark.parametrize("plugins", ["all", "depthwise", "none"])
def test_each_choice_writes_its_plugin_nodes_and_decodes_like_torch(student, exported, reference, plugins):
    convs = streaming_convs(student)
    dense = sum(c.groups == 1 for c in convs)
    depthwise = len(convs) - dense
    assert dense and depthwise
    out, result = exported(plugins)
    assert result.contract.plugins == plugins and result.tensorrt_unsupported == []
    assert json.loads((out / "manifest.json").read_text())["plugins"] == plugins

    (want_plugins, want_plain) = EXPECTED[plugins]
    got_plugins, got_plain, steady = graph_counts(out / "steady.onnx")
    assert got_plugins == (want_plugins[0] * dense, want_plugins[1] * depthwise)
    assert got_plain == (want_plain[0] * dense, want_plain[1] * depthwise)
    used = {n.op_type for n in steady.graph.node if n.domain == DOMAIN}
    assert {f.name for f in steady.functions} == used  # a function body for every op type used, no other
    versions = {o.domain: o.version for o in steady.opset_import}
    assert versions.get(DOMAIN) == (DOMAIN_VERSION if used else None)
    initializers = {i.name: list(i.dims) for i in steady.graph.initializer}
    for node in (n for n in steady.graph.node if n.domain == DOMAIN):
        assert initializers[node.input[2]][0] == 3  # packed (kt, kh, kw, C/group, C_out): folded, time first

    latents, expected, plain = reference
    got = contract_decode(out, latents.numpy(), 2)
    np.testing.assert_allclose(got, plain, atol=1e-5, rtol=0)  # the plugin bodies are the plain ops
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)  # ONNX Runtime's convs sum in another order


def test_packed_weights_are_the_conv_weights(student, exported):
    """Each plugin node's weight initializer is its conv's weight transposed by WEIGHT_PERM."""
    assert SMALL.plugins == "all"
    steady = onnx.load(str(exported(SMALL.plugins)[0] / "steady.onnx"))
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in steady.graph.initializer}
    packed = [weights[n.input[2]] for n in steady.graph.node if n.domain == DOMAIN]
    convs = [c.weight.detach().permute(*WEIGHT_PERM).numpy() for c in streaming_convs(student)]
    assert len(packed) == len(convs)
    for w in packed:
        assert any(w.shape == c.shape and np.array_equal(w, c) for c in convs)


def test_the_old_spelling_means_all_in_options_and_old_manifests(student, tmp_path):
    convs = streaming_convs(student)
    dense = sum(c.groups == 1 for c in convs)
    result = export(student, tmp_path / "old", ExportOptions(**{**SMALL.__dict__, "plugins": "flashvaed"}))
    assert result.contract.plugins == "all"
    assert graph_counts(tmp_path / "old" / "steady.onnx")[:2] == ((dense, len(convs) - dense), (0, 0))
    manifest = tmp_path / "old" / "manifest.json"  # as written before there was a choice
    manifest.write_text(manifest.read_text().replace('"plugins": "all"', '"plugins": "flashvaed"'))
    assert '"plugins": "flashvaed"' in manifest.read_text()
    assert read_manifest(tmp_path / "old").plugins == "all"
    decoder = load(tmp_path / "old")
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 3, 3, 5)
    torch.testing.assert_close(decoder.decode(latents), student.decode(latents), rtol=0, atol=1e-3)


def test_cli_takes_each_choice_and_refuses_others(student, tmp_path):
    save_student(student, tmp_path / "student")
    runner = CliRunner()
    shapes = ["--chunk", "1", "--height", "16", "--width", "16", "--batch", "1"]  # static: the option is the point
    result = runner.invoke(app, ["export", str(tmp_path / "student"), "-o", str(tmp_path / "d"), *shapes])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "d").plugins == "all"  # the default
    args = ["export", str(tmp_path / "student"), "-o", str(tmp_path / "dw"), "--plugins", "depthwise", *shapes]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "plugins depthwise" in result.output, result.output
    result = runner.invoke(app, [*args[:3], str(tmp_path / "x"), "--plugins", "dense", *shapes])
    assert result.exit_code == 2 and "--plugins" in result.output and "all, depthwise, none" in result.output
