"""The fixed-shape pretraining losses (s3rec.static_objectives) equal the default path's, the padding
that feeds them keeps every real value in place, and they compile into one graph that meets the
conditions of a CUDA graph."""
import numpy as np
import pytest
import torch
from torch import nn

from s3rec.config import ObjectiveWeights
from s3rec.data.batch import pad_pretrain_batch
from s3rec.objectives import pretrain_losses
from s3rec.static_objectives import attribute_table, dense_sigmoid_bce, pretrain_losses_static
from tests.test_objectives import ATTR_SIZE, ITEM_SIZE, MAX_LEN, make_batch, small_model


def table_of(batch) -> torch.Tensor:
    """The item x attribute table behind make_batch's attr_index."""
    table = torch.zeros(ITEM_SIZE, ATTR_SIZE, dtype=torch.bool)
    items = batch.original_items.reshape(-1)[batch.attr_index[:, 0]]
    table[items, batch.attr_index[:, 1]] = True
    return table


def grads(model, total):
    return [g for g in torch.autograd.grad(total, list(model.parameters()), allow_unused=True)]


@pytest.mark.parametrize("reduction,pair_form", [("sum", "original"), ("mean", "original"),
                                                 ("sum", "logits")])
def test_static_losses_and_gradients_equal_the_default_path(reduction, pair_form):
    model = small_model(4)
    batch, _ = make_batch(4, B=5, L=7)
    ref = pretrain_losses(model, batch, ObjectiveWeights(), reduction, pair_form)
    g_ref = grads(model, ref["total"])
    padded = pad_pretrain_batch(batch, rows=8, length=MAX_LEN)      # 3 filler rows, 5 columns
    got = pretrain_losses_static(model, padded, table_of(batch), ObjectiveWeights(), reduction,
                                 pair_form)
    g_got = grads(model, got["total"])
    for name in ("aap", "mip", "map", "sp", "total"):
        assert torch.allclose(got[name], ref[name], rtol=1e-5, atol=1e-6), (name, got[name],
                                                                            ref[name])
    assert ref["aap"].item() > 1.0 and ref["map"].item() > 1.0
    for (name, _), a, b in zip(model.named_parameters(), g_got, g_ref):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_static_zero_weights_skip_objectives():
    model = small_model(0)
    batch, _ = make_batch(0)
    padded = pad_pretrain_batch(batch, rows=5, length=9)
    weights = {"aap": 0.0, "mip": 1.0, "map": 0.0, "sp": 0.5}
    ref = pretrain_losses(model, batch, weights)
    got = pretrain_losses_static(model, padded, table_of(batch), weights)
    assert got["aap"].item() == 0 and got["map"].item() == 0
    assert torch.allclose(got["total"], ref["total"], rtol=1e-5)
    none = pretrain_losses_static(model, padded, table_of(batch), dict.fromkeys(weights, 0.0))
    assert none["total"].item() == 0


def test_pad_keeps_values_in_place_and_marks_filler_rows():
    batch, _ = make_batch(1, B=4, L=6)
    p = pad_pretrain_batch(batch, rows=6, length=MAX_LEN)
    assert p.masked_items.shape == (6, MAX_LEN) and p.masked.dtype == torch.bool
    assert torch.equal(p.masked_items[:4, -6:], batch.masked_items)
    assert torch.equal(p.sp_neg[:4, -6:], batch.sp_neg)
    assert (p.original_items[:4, :-6] == 0).all() and not p.masked[:4, :-6].any()
    assert torch.equal(p.positions[0], torch.arange(MAX_LEN))          # absolute, newest last
    assert torch.equal(p.positions[:, -6:], batch.positions[:1].expand(6, 6))
    assert p.rows_real.tolist() == [True] * 4 + [False] * 2
    assert torch.equal(p.original_items[4], p.original_items[0])       # filler copies row 0
    assert p.attr_index.shape == (0, 2) and p.index is None
    with pytest.raises(ValueError, match=r"does not fit \[3, 12\]"):
        pad_pretrain_batch(batch, rows=3, length=MAX_LEN)
    with pytest.raises(ValueError, match="longer than the position window"):
        pad_pretrain_batch(batch, rows=4, length=MAX_LEN + 1)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_an_empty_share_pads_to_the_fixed_shape_and_adds_nothing(reduction):
    """A rank's share of a short last batch can have 0 rows (fewer rows than ranks x
    micro-batches): padded to the fixed shape with rows marked not real, its losses and gradients
    are 0 (not NaN), as the default path's on the empty batch."""
    model = small_model(2)
    batch, _ = make_batch(2, B=4, L=6)
    empty = type(batch)(**{f: (v[:0] if f != "attr_index" else v[:0])
                           for f, v in vars(batch).items() if v is not None})
    assert empty.masked_items.shape == (0, 6)
    p = pad_pretrain_batch(empty, rows=3, length=MAX_LEN)
    assert p.masked_items.shape == (3, MAX_LEN) and not p.rows_real.any()
    assert torch.equal(p.positions[0], torch.arange(MAX_LEN))
    got = pretrain_losses_static(model, p, table_of(batch), ObjectiveWeights(), reduction)
    ref = pretrain_losses(model, empty, ObjectiveWeights(), reduction)
    for name in ("aap", "mip", "map", "sp", "total"):
        assert got[name].item() == 0 and ref[name].item() == 0, name
    assert all(g is None or (g == 0).all() for g in grads(model, got["total"]))


def test_padded_and_unpadded_batches_each_refuse_the_other_path():
    model = small_model(0)
    batch, _ = make_batch(0)
    padded = pad_pretrain_batch(batch, rows=5, length=MAX_LEN)
    with pytest.raises(ValueError, match="use s3rec.static_objectives"):
        pretrain_losses(model, padded, ObjectiveWeights())
    with pytest.raises(ValueError, match="needs a padded batch"):
        pretrain_losses_static(model, batch, table_of(batch), ObjectiveWeights())


def test_attribute_table_is_the_deduplicated_multi_hot_and_checks_ids():
    values = np.array([2, 1, 2, 3], dtype=np.int32)        # item 1: {2, 1, 2}, item 2: {3}
    offsets = np.array([0, 0, 3, 4])
    t = attribute_table(values, offsets, item_size=5, attribute_size=4)
    assert t.shape == (5, 4) and t.dtype == torch.bool
    assert t[1].tolist() == [False, True, True, False] and t[2].tolist() == [False] * 3 + [True]
    assert not t[0].any() and not t[3:].any()               # padding, items without / mask_id
    with pytest.raises(ValueError, match=r"attribute ids 1\.\.3 outside the model's attribute "
                                         r"table 0\.\.2"):
        attribute_table(values, offsets, item_size=5, attribute_size=3)


def test_dense_bce_equals_bceloss_on_sigmoid_including_saturation():
    torch.manual_seed(0)
    x = torch.randn(6, 40) * 3
    x[0, :20] = torch.linspace(-200, 200, 20)
    x[1, :8] = torch.tensor([-30., -60., -100., -150., 30., 60., 100., 150.])
    y = torch.rand(6, 40) < 0.3
    y[1, :8] = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    row_w = torch.tensor([1., 1., 0., 1., 0., 1.])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = (nn.BCELoss(reduction="none")(torch.sigmoid(x1), y.float()).sum(1) * row_w).sum()
    got = dense_sigmoid_bce(x2, y, row_w)
    ref.backward()
    got.backward()
    assert torch.allclose(got, ref, rtol=1e-6) and got.item() > 400
    assert torch.allclose(x2.grad, x1.grad, rtol=1e-5, atol=1e-12)
    assert (x2.grad[[2, 4]] == 0).all()
    xd = (torch.randn(4, 7, dtype=torch.float64) * 2).requires_grad_()
    yd, wd = torch.rand(4, 7) < 0.4, torch.tensor([1., 0., 1., 1.], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: dense_sigmoid_bce(t, yd, wd), (xd,))


@pytest.mark.slow
@pytest.mark.parametrize("fast_dropout", [True, False])
def test_static_losses_compile_to_one_graph_with_the_eager_values(fast_dropout):
    """fullgraph=True: any graph break (a read back, a data-dependent shape) is an error. With
    dropout off the compiled losses equal eager; in training mode (dropout on) it still runs in
    one graph and its gradients are finite."""
    model = small_model(5, fast_dropout=fast_dropout)
    batch, _ = make_batch(5)
    padded = pad_pretrain_batch(batch, rows=6, length=MAX_LEN)
    table = table_of(batch)
    fn = torch.compile(pretrain_losses_static, fullgraph=True, dynamic=False)
    ref = pretrain_losses_static(model, padded, table, ObjectiveWeights())
    got = fn(model, padded, table, ObjectiveWeights())
    for name in ("aap", "mip", "map", "sp", "total"):
        assert torch.allclose(got[name], ref[name], rtol=1e-4, atol=1e-5), name
    for a, b in zip(grads(model, got["total"]), grads(model, ref["total"])):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    model.train()
    out = fn(model, padded, table, ObjectiveWeights())
    assert all(g is None or torch.isfinite(g).all() for g in grads(model, out["total"]))


@pytest.mark.slow
def test_static_graphs_meet_the_cuda_graph_conditions_checked_on_cpu():
    """What inductor checks before it records a compiled graph as a CUDA graph
    (pretrain.compile=reduce-overhead), checked here on the forward and backward graphs
    AOTAutograd makes of the fixed-shape losses in training mode (dropout on): no input mutated
    ("mutated inputs"), only tensor inputs ("non-Tensor inputs"), and no read back to the host.
    Any of these and a GPU would silently run the graphs one kernel at a time."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    seen = []

    def inspect(kind):
        def compiler(gm, example_inputs):
            meta = torch._guards.TracingContext.get().fw_metadata if kind == "forward" else None
            mutated = [i for i, info in enumerate(meta.input_info)
                       if info.mutates_data or info.mutates_metadata
                       or info.mutates_storage_metadata or info.mutation_inductor_storage_resize
                       ] if meta is not None else []
            reads = [n.name for n in gm.graph.nodes if n.op == "call_function"
                     and "_local_scalar_dense" in str(n.target)]
            others = [type(t).__name__ for t in example_inputs
                      if not isinstance(t, (torch.Tensor, torch.SymInt, torch.Generator))]
            seen.append((kind, len(example_inputs), mutated, reads, others))
            return make_boxed_func(gm)
        return compiler

    model = small_model(6)
    model.train()
    batch, _ = make_batch(6)
    padded = pad_pretrain_batch(batch, rows=6, length=MAX_LEN)
    fn = torch.compile(pretrain_losses_static, fullgraph=True, dynamic=False,
                       backend=aot_autograd(fw_compiler=inspect("forward"),
                                            bw_compiler=inspect("backward")))
    fn(model, padded, table_of(batch), ObjectiveWeights())["total"].backward()
    assert [s[0] for s in seen] == ["forward", "backward"], seen
    for kind, n_inputs, mutated, reads, others in seen:
        assert n_inputs > 10 and mutated == [] and reads == [] and others == [], (
            kind, mutated, reads, others)
