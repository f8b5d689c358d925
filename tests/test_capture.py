"""Both entry points capture to the same canonical IR (see fmecompile.capture)."""
from collections import Counter

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import fmecompile as fme
from conftest import tiny_model
from fmecompile.capture import dotted_path
from fmecompile.ir import graph_inputs, module_path

aten = torch.ops.aten
COMPUTE_OPS = {aten.conv2d.default, aten.conv3d.default, aten.linear.default, aten.group_norm.default,
               aten.layer_norm.default, aten.scaled_dot_product_attention.default}


def _aot_graph(tiny):
    return fme.compile(tiny.target, kwargs=tiny.inputs, config=fme.Config(passes=())).graph_module


def _dynamo_graph(tiny):
    graphs = []

    def spy(gm, example_inputs, **kwargs):
        from fmecompile.backend import fme_backend

        runner = fme_backend(gm, example_inputs, options={"passes": ()})
        graphs.append(runner)
        return runner

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(tiny.target, backend=spy, fullgraph=True)(**tiny.inputs)
    (runner,) = graphs  # one graph, no break
    (program,) = runner.programs.values()
    return program


@pytest.fixture(scope="module", params=["svd-tiny", "animatediff-tiny", "svd-vae-tiny"])
def graphs(request):
    tiny = tiny_model(request.param)
    return tiny, _aot_graph(tiny), _dynamo_graph(tiny)


def test_every_computing_node_has_a_concrete_fake_value(graphs):
    _, *gms = graphs
    for gm in gms:
        for node in gm.graph.nodes:
            if node.op == "call_function" and isinstance(node.meta["val"], torch.Tensor):
                val = node.meta["val"]
                assert isinstance(val, FakeTensor)
                assert all(isinstance(s, int) for s in val.shape), node.format_node()


def test_module_paths_name_real_submodules(graphs):
    tiny, *gms = graphs
    for gm in gms:
        paths = {module_path(n) for n in gm.graph.nodes if n.op == "call_function"}
        assert len(paths) > 20
        for path in paths - {""}:
            tiny.model.get_submodule(path)  # raises if the path is not the model's
        stacks = [n.meta["nn_module_stack"] for n in gm.graph.nodes if n.op == "call_function"]
        # outermost to innermost: every path extends the one before it
        for stack in stacks:
            keys = list(stack)
            assert all(b.startswith(a + ".") for a, b in zip(keys, keys[1:])), keys


def test_placeholders_say_what_they_are(graphs):
    tiny, *gms = graphs
    params = dict(tiny.model.named_parameters())
    param_sets = []
    for gm in gms:
        roles = graph_inputs(gm)
        nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
        used = {r.name for n, r in zip(nodes, roles) if r.kind == "parameter" and n.users}
        assert used <= set(params) and len(used) > 50
        param_sets.append(used)
        for node, role in zip(nodes, roles):
            if role.kind == "parameter":
                assert tuple(node.meta["val"].shape) == tuple(params[role.name].shape)
        users = {r.name for r in roles if r.kind == "user"}
        tensor_inputs = {k for k, v in tiny.inputs.items() if isinstance(v, torch.Tensor)}
        assert tensor_inputs <= users
    assert param_sets[0] == param_sets[1]  # both entry points use the same weights


def test_both_entry_points_compute_the_same_ops(graphs):
    _, aot, dyn = graphs

    def compute(gm):
        return Counter((n.target, module_path(n)) for n in gm.graph.nodes if n.target in COMPUTE_OPS)

    assert compute(aot) == compute(dyn)
    assert sum(compute(aot).values()) > 30


def test_no_asserts_or_eval_dropouts_remain(graphs):
    _, *gms = graphs
    for gm in gms:
        targets = {n.target for n in gm.graph.nodes}
        assert aten._assert_tensor_metadata.default not in targets
        assert aten.dropout.default not in targets


def test_symbolic_trace_cannot_capture_these_unets(svd_tiny):
    # Why capture goes through dynamo and torch.export (see the module docstring).
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(svd_tiny.model)


@pytest.mark.parametrize("source, expected", [
    ("L['self'].__dict__['_modules']['conv_in']._parameters['weight']", "conv_in.weight"),
    ("L['self'].down_blocks[0].resnets[1]", "down_blocks.0.resnets.1"),
    ("L['self']._modules['decoder']._modules['up_blocks']._modules['3']", "decoder.up_blocks.3"),
    ("L['added_cond_kwargs']['text_embeds']", "added_cond_kwargs.text_embeds"),
    ("L['sample']", "sample"),
])
def test_dotted_path(source, expected):
    assert dotted_path(source) == expected


def test_dotted_path_with_numeric_attributes():
    assert dotted_path("L['self'].__dict__['_modules']['down_blocks'].0.attentions.0") == "down_blocks.0.attentions.0"
