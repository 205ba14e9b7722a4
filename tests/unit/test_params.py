"""Flat layouts and codecs on the built-in models, checked against the models' own tensors."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gossip.core.codecs import PayloadReceiver, encode, payload_nbytes
from gossip.core.layout import Layout, LayoutError
from gossip.core.params import DTYPES, FlatParams
from gossip.train.models import build_model

DIGITS_SHAPE = (1, 8, 8)
BUILTIN_MODELS = ["logreg", "mlp", "cnn"]


def _model(spec: str, seed: int = 0) -> nn.Module:
    return build_model(spec, DIGITS_SHAPE, 10, seed=seed)


class _Mixed(nn.Module):
    """A float32 weight, a second-dtype bias and a third float32 tensor after it."""

    def __init__(self, other: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(3, 5, generator=g))
        self.b = nn.Parameter(torch.randn(7, generator=g).to(other))
        self.c = nn.Parameter(torch.randn(2, 2, generator=g))


def _feed(receiver: PayloadReceiver, views: list[memoryview], piece: int) -> None:
    """Write the payload in pieces of ``piece`` bytes that straddle segment boundaries."""
    data = b"".join(bytes(v) for v in views)
    for start in range(0, len(data), piece):
        receiver.write(data[start : start + piece])


def _layout_json(*entries: tuple[str, str, list[int], int]) -> list[dict[str, object]]:
    return [{"name": n, "dtype": d, "shape": s, "offset": o} for n, d, s, o in entries]


# --- binding ----------------------------------------------------------------------


@pytest.mark.parametrize("spec", BUILTIN_MODELS)
def test_bind_preserves_parameter_values(spec: str) -> None:
    model = _model(spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    FlatParams.bind(model)

    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


@pytest.mark.parametrize("spec", BUILTIN_MODELS)
def test_bind_makes_every_parameter_a_view_of_its_segment(spec: str) -> None:
    model = _model(spec)

    flat = FlatParams.bind(model)

    seg = flat.segments["float32"]
    lo, hi = seg.data_ptr(), seg.data_ptr() + seg.numel() * seg.element_size()
    for e in flat.layout.entries:
        p = dict(model.named_parameters())[e.name]
        assert p.data_ptr() == lo + e.offset * seg.element_size(), e.name
        assert p.data_ptr() + p.numel() * p.element_size() <= hi
    assert flat.numel == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("spec", BUILTIN_MODELS)
def test_writing_the_segment_changes_the_model(spec: str) -> None:
    model = _model(spec)
    flat = FlatParams.bind(model)
    ramp = torch.arange(flat.numel, dtype=torch.float32)

    flat.segments["float32"].copy_(ramp)

    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(got, ramp)


@pytest.mark.parametrize("spec", BUILTIN_MODELS)
def test_writing_the_model_changes_the_segment(spec: str) -> None:
    model = _model(spec)
    flat = FlatParams.bind(model)
    expected = flat.segments["float32"].clone() * 3 + 1

    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3).add_(1)

    assert torch.equal(flat.segments["float32"], expected)


@pytest.mark.parametrize("spec", BUILTIN_MODELS)
def test_optimizer_built_before_bind_updates_the_segment(spec: str) -> None:
    model = _model(spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    flat = FlatParams.bind(model)
    before = flat.segments["float32"].clone()
    x = torch.randn(4, math.prod(DIGITS_SHAPE), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])

    torch.nn.functional.cross_entropy(model(x), y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]
    opt.step()

    torch.testing.assert_close(flat.segments["float32"], before - 0.5 * grad)
    assert not torch.equal(flat.segments["float32"], before)


def test_layout_follows_named_parameters_order() -> None:
    model = _model("mlp")

    layout = Layout.of_model(model)

    assert [e.name for e in layout.entries] == [n for n, _ in model.named_parameters()]
    assert [e.shape for e in layout.entries] == [tuple(p.shape) for p in model.parameters()]


def test_state_dict_names_views_equal_to_the_model() -> None:
    model = _model("cnn")
    flat = FlatParams.bind(model)

    state = flat.state_dict()

    assert list(state) == [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        assert state[name].data_ptr() == p.data_ptr()
        assert torch.equal(state[name], p.detach())


def test_bind_rejects_a_model_without_trainable_parameters() -> None:
    model = nn.Sequential(nn.Flatten())

    with pytest.raises(LayoutError):
        FlatParams.bind(model)


def test_layout_leaves_out_frozen_parameters() -> None:
    model = nn.Module()
    model.register_parameter("n", nn.Parameter(torch.zeros(3, dtype=torch.int32), requires_grad=False))
    model.register_parameter("w", nn.Parameter(torch.zeros(3)))

    layout = Layout.of_model(model)

    assert [e.name for e in layout.entries] == ["w"]  # frozen tensors are not part of the layout


# --- layout json and fingerprint ------------------------------------------------------


@pytest.mark.parametrize("spec", BUILTIN_MODELS)
def test_layout_json_round_trip(spec: str) -> None:
    layout = Layout.of_model(_model(spec))

    back = Layout.from_json(json.loads(json.dumps(layout.to_json())))

    assert back == layout
    assert back.fingerprint() == layout.fingerprint()


def test_mixed_layout_json_round_trip() -> None:
    layout = Layout.of_model(_Mixed(torch.float64))

    back = Layout.from_json(json.loads(json.dumps(layout.to_json())))

    assert back == layout


MALFORMED = {
    "not a list": {"name": "w", "dtype": "float32", "shape": [2], "offset": 0},
    "empty": [],
    "entry not a dict": ["w"],
    "entry is null": [None],
    "missing name": [{"dtype": "float32", "shape": [2], "offset": 0}],
    "missing dtype": [{"name": "w", "shape": [2], "offset": 0}],
    "missing shape": [{"name": "w", "dtype": "float32", "offset": 0}],
    "missing offset": [{"name": "w", "dtype": "float32", "shape": [2]}],
    "unknown dtype": _layout_json(("w", "int8", [2], 0)),
    "complex dtype": _layout_json(("w", "complex64", [2], 0)),
    "negative dimension": _layout_json(("w", "float32", [2, -1], 0)),
    "non-numeric dimension": _layout_json(("w", "float32", ["two"], 0)),
    "shape is null": _layout_json(("w", "float32", None, 0)),  # type: ignore[arg-type]
    "nested shape": _layout_json(("w", "float32", [[2]], 0)),  # type: ignore[list-item]
    "shape is a string": _layout_json(("w", "float32", "34", 0)),  # type: ignore[arg-type]
    "fractional dimension": _layout_json(("w", "float32", [2.5], 0)),  # type: ignore[list-item]
    "infinite dimension": _layout_json(("w", "float32", [math.inf], 0)),  # type: ignore[list-item]
    "nan offset": _layout_json(("w", "float32", [2], math.nan)),  # type: ignore[arg-type]
    "infinite offset": _layout_json(("w", "float32", [2], math.inf)),  # type: ignore[arg-type]
    "dimension beyond int64": _layout_json(("w", "float32", [2**70], 0)),
    "duplicate names": _layout_json(("w", "float32", [2], 0), ("w", "float32", [2], 2)),
    "offset gap": _layout_json(("w", "float32", [2], 0), ("b", "float32", [2], 3)),
    "overlapping offsets": _layout_json(("w", "float32", [2], 0), ("b", "float32", [2], 1)),
    "first offset not zero": _layout_json(("w", "float32", [2], 1)),
    "offset across dtypes": _layout_json(("w", "float32", [2], 0), ("b", "float64", [2], 2)),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_from_json_rejects_malformed_layouts(data: object) -> None:
    with pytest.raises(LayoutError):
        Layout.from_json(data)


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_entry_like = st.fixed_dictionaries(
    {
        "name": st.one_of(st.text(max_size=4), _json_scalars),
        "dtype": st.one_of(st.sampled_from(sorted(DTYPES)), _json_scalars),
        "shape": st.one_of(st.lists(_json_scalars, max_size=3), _json_values),
        "offset": _json_scalars,
    }
)


@settings(max_examples=150, deadline=None)
@given(st.one_of(_json_values, st.lists(_entry_like, max_size=3)))
def test_from_json_raises_only_layout_error(data: object) -> None:
    try:
        layout = Layout.from_json(data)
    except LayoutError:
        return
    assert Layout.from_json(layout.to_json()) == layout


def test_fingerprint_equal_for_the_same_architecture() -> None:
    a = Layout.of_model(_model("cnn", seed=0))
    b = Layout.of_model(_model("cnn", seed=1))

    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 16


def test_fingerprint_differs_between_models() -> None:
    prints = {Layout.of_model(_model(spec)).fingerprint() for spec in BUILTIN_MODELS}

    assert len(prints) == len(BUILTIN_MODELS)


def test_fingerprint_differs_for_a_different_shape() -> None:
    a = Layout.from_named([("w", torch.zeros(4, 3))])
    b = Layout.from_named([("w", torch.zeros(3, 4))])

    assert a.fingerprint() != b.fingerprint()


def test_fingerprint_differs_for_a_different_name() -> None:
    a = Layout.from_named([("w", torch.zeros(4))])
    b = Layout.from_named([("v", torch.zeros(4))])

    assert a.fingerprint() != b.fingerprint()


def test_fingerprint_differs_for_a_different_dtype() -> None:
    a = Layout.from_named([("w", torch.zeros(4))])
    b = Layout.from_named([("w", torch.zeros(4, dtype=torch.float64))])

    assert a.fingerprint() != b.fingerprint()


def test_fingerprint_differs_for_a_different_order() -> None:
    a = Layout.from_named([("w", torch.zeros(4)), ("b", torch.zeros(2))])
    b = Layout.from_named([("b", torch.zeros(2)), ("w", torch.zeros(4))])

    assert a.fingerprint() != b.fingerprint()


# --- mixed dtypes -----------------------------------------------------------------


@pytest.mark.parametrize("other", [torch.float64, torch.bfloat16, torch.float16])
def test_mixed_dtypes_make_one_segment_per_dtype(other: torch.dtype) -> None:
    model = _Mixed(other)
    name = {v: k for k, v in DTYPES.items()}[other]

    flat = FlatParams.bind(model)

    assert flat.layout.segments == {"float32": 15 + 4, name: 7}
    assert [s.dtype for s in flat] == [torch.float32, other]
    assert model.c.data_ptr() == flat.segments["float32"].data_ptr() + 15 * 4
    assert model.b.data_ptr() == flat.segments[name].data_ptr()
    assert model.b.dtype == other


@pytest.mark.parametrize("other", [torch.float64, torch.bfloat16])
def test_mixed_dtypes_round_trip_raw(other: torch.dtype) -> None:
    src = FlatParams.bind(_Mixed(other))
    receiver = PayloadReceiver(src.layout, "raw")

    _feed(receiver, encode(src, "raw"), piece=7)
    out = receiver.finish()

    for dt, seg in src.segments.items():
        assert torch.equal(out.segments[dt], seg)


def test_concat_bytes_covers_every_segment_in_order() -> None:
    flat = FlatParams.bind(_Mixed(torch.float64))

    data = bytes(flat.concat_bytes())

    assert data == b"".join(bytes(v) for v in flat.byte_views())
    assert len(data) == flat.nbytes == 19 * 4 + 7 * 8


# --- codecs -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", BUILTIN_MODELS)
@pytest.mark.parametrize("piece", [1, 13, 4099])
def test_raw_codec_round_trip_is_exact(spec: str, piece: int) -> None:
    src = FlatParams.bind(_model(spec))
    receiver = PayloadReceiver(src.layout, "raw")

    _feed(receiver, encode(src, "raw"), piece)
    out = receiver.finish()

    assert torch.equal(out.segments["float32"], src.segments["float32"])


@pytest.mark.parametrize(
    ("codec", "wire", "rtol"), [("fp16", torch.float16, 2**-11), ("bf16", torch.bfloat16, 2**-8)]
)
@pytest.mark.parametrize("other", [torch.float32, torch.float64])
def test_half_codecs_round_trip_within_their_precision(
    codec: str, wire: torch.dtype, rtol: float, other: torch.dtype
) -> None:
    src = FlatParams.bind(_Mixed(other))
    receiver = PayloadReceiver(src.layout, codec)

    _feed(receiver, encode(src, codec), piece=11)
    out = receiver.finish()

    for dt, seg in src.segments.items():
        assert out.segments[dt].dtype == seg.dtype
        torch.testing.assert_close(out.segments[dt], seg, rtol=rtol, atol=1e-6)
        # Exactly what one rounding to the wire dtype gives, not merely close.
        assert torch.equal(out.segments[dt], seg.to(wire).to(seg.dtype))


def test_receiver_writes_into_a_given_flat_params() -> None:
    src = FlatParams.bind(_model("logreg", seed=1))
    dst_model = _model("logreg", seed=2)
    dst = FlatParams.bind(dst_model)
    receiver = PayloadReceiver(src.layout, "raw", out=dst)

    _feed(receiver, encode(src, "raw"), piece=1000)
    out = receiver.finish()

    assert out is dst
    assert torch.equal(dst_model[1].weight.detach().reshape(-1), src.segments["float32"][:640])


@pytest.mark.parametrize("codec", ["raw", "fp16", "bf16"])
def test_payload_nbytes_matches_encoded_bytes(codec: str) -> None:
    flat = FlatParams.bind(_Mixed(torch.float64))

    encoded = sum(len(v) for v in encode(flat, codec))

    assert payload_nbytes(flat.layout, codec) == encoded


def test_payload_nbytes_values() -> None:
    layout = Layout.of_model(_Mixed(torch.float64))

    assert payload_nbytes(layout, "raw") == 19 * 4 + 7 * 8
    assert payload_nbytes(layout, "fp16") == 26 * 2
    assert payload_nbytes(layout, "bf16") == 26 * 2


def test_unknown_codec_is_a_layout_error() -> None:
    flat = FlatParams.bind(_model("logreg"))

    with pytest.raises(LayoutError):
        payload_nbytes(flat.layout, "int8")
    with pytest.raises(LayoutError):
        encode(flat, "int8")
    with pytest.raises(LayoutError):
        PayloadReceiver(flat.layout, "int8")


@pytest.mark.parametrize("codec", ["raw", "fp16"])
def test_receiver_rejects_bytes_beyond_the_payload(codec: str) -> None:
    layout = Layout.of_model(_model("logreg"))
    receiver = PayloadReceiver(layout, codec)
    receiver.write(b"\0" * (receiver.expected - 3))

    with pytest.raises(LayoutError):
        receiver.write(b"\0" * 4)


def test_receiver_rejects_one_byte_too_many_after_a_full_payload() -> None:
    layout = Layout.of_model(_model("logreg"))
    receiver = PayloadReceiver(layout, "raw")
    receiver.write(b"\0" * receiver.expected)

    with pytest.raises(LayoutError):
        receiver.write(b"\0")


@pytest.mark.parametrize("codec", ["raw", "bf16"])
def test_finish_rejects_a_short_payload(codec: str) -> None:
    layout = Layout.of_model(_model("logreg"))
    receiver = PayloadReceiver(layout, codec)
    receiver.write(b"\0" * (receiver.expected - 1))

    with pytest.raises(LayoutError):
        receiver.finish()


def test_finish_rejects_an_empty_payload() -> None:
    receiver = PayloadReceiver(Layout.of_model(_model("logreg")), "raw")

    with pytest.raises(LayoutError):
        receiver.finish()


@settings(max_examples=40, deadline=None)
@given(
    cuts=st.lists(st.integers(0, 26 * 2 + 19 * 4 + 7 * 8), max_size=8), codec=st.sampled_from(["raw", "fp16"])
)
def test_any_split_of_the_payload_reassembles(cuts: list[int], codec: str) -> None:
    src = FlatParams.bind(_Mixed(torch.float64))
    data = b"".join(bytes(v) for v in encode(src, codec))
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    receiver = PayloadReceiver(src.layout, codec)

    for lo, hi in itertools.pairwise(bounds):
        receiver.write(memoryview(data)[lo:hi])
    out = receiver.finish()

    whole = PayloadReceiver(src.layout, codec)
    whole.write(data)
    reference = whole.finish()
    for dt in src.segments:
        assert torch.equal(out.segments[dt], reference.segments[dt])
