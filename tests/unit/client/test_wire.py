"""The wire codec: bit-exact round trips, real safetensors files, a WireError for every malformed input."""

from __future__ import annotations

import base64
import json
import math
import re
import struct

import numpy as np
import pytest
import torch

from r2m.client import R2MError, WireError, WireTensor
from r2m.client.wire import (
    MAX_NDIM,
    decode_binary,
    encode_binary,
    jsonify_request,
    pack_request,
    tensor_from_json,
    tensor_to_json,
    unpack_request,
)

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
SHAPES = [(), (0,), (0, 5), (3,), (1, 1, 1), (7, 13), (2, 3, 5), (1,) * MAX_NDIM]
# NaN payloads, signalling NaNs, -0.0 and infinities: all must survive bit for bit.
SPECIAL_BITS = {
    "float32": np.array([0x7FC00001, 0xFFFFFFFF, 0x7F800001, 0x80000000, 0x7F800000], np.uint32),
    "float16": np.array([0x7E01, 0x7C01, 0xFFFF, 0x8000, 0x7C00], np.uint16),
    "bfloat16": np.array([0x7FC1, 0x7F81, 0xFFFF, 0x8000, 0x7F80], np.uint16),
}


def random_tensor(dtype: str, shape: tuple[int, ...], seed: int = 0) -> WireTensor:
    """Random raw bytes: every bit pattern, NaN payloads included, is fair game."""
    n = math.prod(shape) * ITEMSIZE[dtype]
    return WireTensor(dtype, shape, np.random.default_rng(seed).bytes(n))


def special_tensor(dtype: str) -> WireTensor:
    bits = SPECIAL_BITS[dtype].astype(SPECIAL_BITS[dtype].dtype.newbyteorder("<"))
    return WireTensor(dtype, bits.shape, bits.tobytes())


def binary_round_trip(t: WireTensor) -> WireTensor:
    payload, tensors = decode_binary(encode_binary({"x": {"ref": "a"}}, {"a": t}))
    return unpack_request(payload, tensors)["x"]


def make_body(header: dict, data: bytes = b"", *, meta: object = None) -> bytes:
    """A safetensors body built by hand, so every field can be broken on purpose."""
    header = dict(header)
    if meta is not None:
        header["__metadata__"] = meta
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


GOOD_META = {"r2m": json.dumps({"x": {"ref": "a"}})}


# --- round trips --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(ITEMSIZE))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_json_and_binary_round_trips_are_bit_exact(dtype, shape):
    t = random_tensor(dtype, shape)
    back = tensor_from_json(json.loads(json.dumps(tensor_to_json(t))), "x")
    assert back == t and back.shape == shape and bytes(back.data) == bytes(t.data)
    assert binary_round_trip(t) == t


@pytest.mark.parametrize("dtype", list(ITEMSIZE))
def test_nan_payloads_and_signed_zeros_survive(dtype):
    t = special_tensor(dtype)
    for back in (tensor_from_json(tensor_to_json(t), "x"), binary_round_trip(t)):
        assert np.array_equal(back.to_numpy().view(SPECIAL_BITS[dtype].dtype), SPECIAL_BITS[dtype])


def test_json_form_is_standard_padded_base64_of_little_endian_bytes():
    obj = tensor_to_json(WireTensor.from_array(np.array([[1.0, -2.0]], np.float16)))
    assert obj == {"dtype": "float16", "shape": [1, 2], "data": "ADwAwA=="}  # bytes 00 3c 00 c0, padded


def test_numpy_arrays_convert_as_documented():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(WireTensor.from_array(x).to_numpy(), x)
    half = WireTensor.from_array(x.astype(np.float16))
    assert half.dtype == "float16" and half.to_numpy().dtype == np.float16
    wide = WireTensor.from_array(x.astype(np.float64))  # float64 is sent as float32
    assert wide.dtype == "float32" and np.array_equal(wide.to_numpy(), x)
    big_endian = WireTensor.from_array(x.astype(">f4"))
    assert bytes(big_endian.data) == x.astype("<f4").tobytes()
    transposed = WireTensor.from_array(x.T)
    assert transposed.shape == (4, 3) and np.array_equal(transposed.to_numpy(), x.T)


@pytest.mark.parametrize("bad", [np.arange(3), np.zeros(3, np.complex64), np.zeros(3, bool), [1.0, 2.0], 1.5])
def test_unsupported_inputs_name_the_dtype_and_the_allowed_ones(bad):
    with pytest.raises(WireError, match=r"hidden\[2\]: .*(dtype|expected a numpy array)") as info:
        WireTensor.from_array(bad, path="hidden[2]")
    if isinstance(bad, np.ndarray):
        assert str(bad.dtype) in str(info.value) and "bfloat16" in str(info.value)


def test_too_many_dimensions_are_rejected():
    with pytest.raises(WireError, match="at most 8"):
        WireTensor.from_array(np.zeros((1,) * 9, np.float32))


def test_bfloat16_to_float32_is_exact():
    bits = np.array([0x3F80, 0xC000, 0x7FC1, 0x0001, 0x8000], np.uint16)  # 1, -2, NaN payload, denormal, -0
    t = WireTensor("bfloat16", (5,), bits.astype("<u2").tobytes())
    assert t.to_numpy().dtype == np.uint16 and np.array_equal(t.to_numpy(), bits)
    assert np.array_equal(t.to_float32().view(np.uint32), bits.astype(np.uint32) << 16)


def test_ml_dtypes_bfloat16_arrays_are_accepted():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.array([1.0, -2.5, 3.0], dtype=ml_dtypes.bfloat16)
    t = WireTensor.from_array(x)
    assert t.dtype == "bfloat16" and np.array_equal(t.to_numpy(), x.view(np.uint16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_round_trip_is_bit_exact(dtype):
    bits = torch.randint(-(2**15), 2**15, (5, 7), dtype=torch.int16)
    x = bits.view(torch.bfloat16) if dtype == torch.bfloat16 else torch.randn(5, 7).to(dtype)
    t = WireTensor.from_array(x)
    for back in (
        t.to_torch(),
        binary_round_trip(t).to_torch(),
        tensor_from_json(tensor_to_json(t)).to_torch(),
    ):
        assert back.dtype == dtype and back.shape == (5, 7)
        bits_dtype = torch.int16 if x.element_size() == 2 else torch.int32
        assert torch.equal(back.view(bits_dtype), x.view(bits_dtype))


def test_torch_bfloat16_goes_to_float32_like_torch():
    x = torch.randn(4, 9).to(torch.bfloat16)
    assert np.array_equal(WireTensor.from_array(x).to_float32(), x.float().numpy())


def test_torch_inputs_noncontiguous_grad_and_float64():
    base = torch.randn(6, 4, requires_grad=True)
    t = WireTensor.from_array(base.T)  # non-contiguous, requires grad
    assert t.shape == (4, 6) and torch.equal(t.to_torch(), base.detach().T)
    wide = WireTensor.from_array(torch.randn(3, 2, dtype=torch.float64))
    assert wide.dtype == "float32"
    with pytest.raises(WireError, match=r"torch.int64 is not supported; use float32, float16 or bfloat16"):
        WireTensor.from_array(torch.arange(3))


def test_to_torch_is_a_writable_copy():
    body = bytearray(encode_binary({"x": {"ref": "a"}}, {"a": WireTensor.from_array(np.ones((2, 3), np.float16))}))
    _, tensors = decode_binary(body)
    out = tensors["a"].to_torch()
    out += 1
    assert tensors["a"].to_numpy().tolist() == [[1.0] * 3] * 2
    assert WireTensor("float32", (0, 4), b"").to_torch().shape == (0, 4)


def test_to_torch_can_copy_into_a_row_of_a_padded_batch():
    rows = [torch.randn(3, 4).to(torch.bfloat16), torch.randn(2, 4).to(torch.bfloat16)]
    batch = torch.zeros(2, 5, 4, dtype=torch.bfloat16)
    for i, row in enumerate(rows):
        t = binary_round_trip(WireTensor.from_array(row))
        assert t.to_torch(out=batch[i, : row.shape[0]]) is not None
    assert torch.equal(batch[0, :3], rows[0]) and torch.equal(batch[1, :2], rows[1])
    assert not batch[1, 2:].any()  # padding untouched
    t = WireTensor.from_array(rows[0])
    with pytest.raises(WireError, match=r"out must be a CPU torch.bfloat16 tensor of shape \[3, 4\]"):
        t.to_torch(out=torch.zeros(3, 4))
    with pytest.raises(WireError, match="contiguous"):
        t.to_torch(out=torch.zeros(4, 3, dtype=torch.bfloat16).T)


# --- the binary form is a real safetensors file -------------------------------------------------------------


def test_binary_bodies_are_readable_by_safetensors(tmp_path):
    import safetensors
    import safetensors.numpy
    import safetensors.torch

    f32 = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    f16 = np.random.default_rng(2).standard_normal((7,)).astype(np.float16)
    bf16 = torch.randn(2, 3, 4).to(torch.bfloat16)
    payload = {"items": [{"prompt": "p", "a": {"ref": "a"}, "b": {"ref": "b"}, "c": {"ref": "c"}}], "step": 3}
    tensors = {
        "a": WireTensor.from_array(f32),
        "b": WireTensor.from_array(f16),
        "c": WireTensor.from_array(bf16),
    }
    body = encode_binary(payload, tensors)

    (header_len,) = struct.unpack("<Q", body[:8])
    assert (8 + header_len) % 8 == 0  # the data section is 8-byte aligned
    loaded = safetensors.torch.load(body)
    assert torch.equal(loaded["c"].view(torch.int16), bf16.view(torch.int16))
    assert np.array_equal(loaded["a"].numpy(), f32) and np.array_equal(loaded["b"].numpy(), f16)
    no_bf16 = encode_binary(payload, {k: tensors[k] for k in "ab"})
    loaded_np = safetensors.numpy.load(no_bf16)
    assert np.array_equal(loaded_np["a"], f32) and np.array_equal(loaded_np["b"], f16)
    path = tmp_path / "body.safetensors"
    path.write_bytes(body)
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["r2m"]) == payload


def test_bodies_written_by_safetensors_decode():
    import safetensors.numpy

    x = np.random.default_rng(3).standard_normal((4, 6)).astype(np.float16)
    payload = {"items": [{"prompt": "p", "response": "r", "policy_hidden": {"ref": "h"}}]}
    body = safetensors.numpy.save({"h": x}, metadata={"r2m": json.dumps(payload)})
    request = unpack_request(*decode_binary(body))
    assert np.array_equal(request["items"][0]["policy_hidden"].to_numpy(), x)


def test_decoded_tensors_are_zero_copy_slices_of_the_body():
    body = bytearray(encode_binary({"x": {"ref": "a"}}, {"a": WireTensor.from_array(np.zeros(4, np.float32))}))
    _, tensors = decode_binary(body)
    body[-4:] = np.float32(7.0).tobytes()
    assert tensors["a"].to_numpy()[-1] == 7.0


def test_utf8_text_survives_the_binary_form():
    payload = {"items": [{"prompt": "¿Cuánto es 2+2? 你好 🙂", "response": 'four\n"quoted"'}]}
    assert decode_binary(encode_binary(payload, {}))[0] == payload


def test_encode_rejects_what_json_cannot_carry():
    with pytest.raises(WireError, match="not JSON-serializable"):
        encode_binary({"x": float("nan")}, {})
    with pytest.raises(WireError, match="cannot name a tensor"):
        encode_binary({}, {"__metadata__": WireTensor("float32", (0,), b"")})


# --- malformed binary bodies --------------------------------------------------------------------------------

A = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def bad_a(**changes: object) -> bytes:
    """A body whose one tensor `a` (2 float32, 8 bytes of data) has `changes` applied to its header entry."""
    return make_body({"a": {**A, **changes}}, bytes(8), meta=GOOD_META)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\x01\x00", "body: 2 bytes is too short"),
        (struct.pack("<Q", 1000) + b"{}", "header length 1000 runs past the end"),
        (struct.pack("<Q", 5) + b"{{{{{", "header: not valid UTF-8 JSON"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "header: not valid UTF-8 JSON"),
        (struct.pack("<Q", 2) + b"[]", "header: expected a JSON object"),
        (make_body({}), r"header.__metadata__.r2m: missing"),
        (make_body({}, meta={"other": "x"}), r"header.__metadata__.r2m: missing"),
        (make_body({}, meta={"r2m": 5}), r"header.__metadata__.r2m: missing"),
        (make_body({}, meta={"r2m": "{not json"}), r"header.__metadata__.r2m: not valid JSON"),
        (make_body({}, meta={"r2m": "[1]"}), r"header.__metadata__.r2m: expected a JSON object"),
        (bad_a(dtype="F64"), r"header.a.dtype: unknown dtype 'F64'"),
        (bad_a(dtype=["F32"]), r"header.a.dtype: unknown dtype"),
        (make_body({"a": [1]}, bytes(8), meta=GOOD_META), r"header.a: a tensor entry has exactly the keys"),
        (bad_a(extra=1), r"header.a: a tensor entry has exactly"),
        (bad_a(shape=[-2]), r"header.a.shape: shape\[0\] must be"),
        (bad_a(shape=[True]), r"header.a.shape: shape\[0\] must"),
        (bad_a(shape=[2.0]), r"header.a.shape: shape\[0\] must"),
        (bad_a(shape=2), r"header.a.shape: shape must be a list"),
        (bad_a(data_offsets=[0, 16]), r"header.a.data_offsets: .*<= 8"),
        (bad_a(data_offsets=[-8, 0]), r"header.a.data_offsets"),
        (bad_a(data_offsets=[8, 0]), r"header.a.data_offsets"),
        (bad_a(data_offsets=[0, 8, 8]), r"header.a.data_offsets"),
        (bad_a(data_offsets=[False, 8]), r"header.a.data_offsets"),
        (bad_a(data_offsets=[0.0, 8]), r"header.a.data_offsets"),
        (bad_a(shape=[3]), r"spans 8 bytes; shape \[3\] of float32"),
        (
            make_body({"a": A, "b": {**A, "data_offsets": [4, 12]}}, bytes(12), meta=GOOD_META),
            r"header.b.data_offsets: overlaps tensor 'a'",
        ),
    ],
)
def test_malformed_binary_bodies_raise_wire_errors_that_say_where(body, match):
    with pytest.raises(WireError, match=match):
        decode_binary(body)


def test_header_length_is_checked_against_the_limit_before_parsing():
    body = make_body({}, meta=GOOD_META)
    with pytest.raises(WireError, match="over the limit of 16 bytes"):
        decode_binary(body, max_header_bytes=16)
    with pytest.raises(WireError, match="over the limit"):
        decode_binary(struct.pack("<Q", 2**63) + b"{}")


def test_wire_errors_are_value_errors_and_r2m_errors():
    with pytest.raises(ValueError):
        decode_binary(b"")
    with pytest.raises(R2MError):
        decode_binary(b"")


# --- malformed JSON tensors ---------------------------------------------------------------------------------

PATH = "items[3].policy_hidden"
P = re.escape(PATH)
GOOD = {"dtype": "float16", "shape": [2, 3], "data": base64.b64encode(bytes(12)).decode()}


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ("abc", rf"^{P}: expected a tensor object"),
        ([1, 2], rf"^{P}: expected a tensor object"),
        ({"dtype": "float16", "shape": [2, 3]}, rf"^{P}: .*missing \['data'\]"),
        ({**GOOD, "device": "cuda"}, rf"^{P}: .*unexpected \['device'\]"),
        ({**GOOD, "dtype": "float64"}, rf"^{P}.dtype: unknown dtype 'float64'; expected float32, float16 or"),
        ({**GOOD, "dtype": None}, rf"^{P}.dtype: unknown dtype None"),
        ({**GOOD, "shape": [2, -3]}, rf"^{P}.shape: shape\[1\] must be a non-negative integer, got -3"),
        ({**GOOD, "shape": [True, 3]}, rf"^{P}.shape: shape\[0\] must be a non-negative integer, got True"),
        ({**GOOD, "shape": [2.0, 3]}, rf"^{P}.shape: shape\[0\] must be"),
        ({**GOOD, "shape": ["2", 3]}, rf"^{P}.shape: shape\[0\] must be"),
        ({**GOOD, "shape": "2,3"}, rf"^{P}.shape: shape must be a list"),
        ({**GOOD, "shape": [1] * 9, "data": "AAAA"}, rf"^{P}.shape: shape has 9 dimensions; at most 8"),
        ({**GOOD, "data": 12}, rf"^{P}.data: expected a base64 string"),
        ({**GOOD, "data": "A" * 15 + "!"}, rf"^{P}.data: not valid standard base64"),
        ({**GOOD, "data": "A" * 15 + "\n"}, rf"^{P}.data: not valid standard base64"),
        ({**GOOD, "data": base64.urlsafe_b64encode(b"\xff" * 12).decode()}, rf"^{P}.data: not valid"),
        ({**GOOD, "data": base64.b64encode(bytes(8)).decode()}, rf"^{P}.data: 12 base64 characters cannot"),
        ({**GOOD, "data": base64.b64encode(bytes(14)).decode()}, rf"^{P}.data: 20 base64 characters cannot"),
        (
            {**GOOD, "shape": [1], "data": "AAAA"},
            rf"^{P}.data: decodes to 3 bytes; shape \[1\] of float16 needs 2",
        ),
    ],
)
def test_malformed_json_tensors_raise_wire_errors_naming_the_field(obj, match):
    obj = json.loads(json.dumps(obj))  # exactly what a JSON body can carry
    with pytest.raises(WireError, match=match):
        tensor_from_json(obj, PATH)


def test_wire_tensor_checks_its_own_invariants():
    with pytest.raises(WireError, match="needs 8"):
        WireTensor("float32", (2,), b"\x00" * 7)
    with pytest.raises(WireError, match="unknown dtype 'int8'"):
        WireTensor("int8", (1,), b"\x00")


# --- request trees ------------------------------------------------------------------------------------------


def tree() -> dict:
    h0 = WireTensor.from_array(np.ones((2, 4), np.float16))
    h2 = WireTensor.from_array(torch.randn(3, 4).to(torch.bfloat16))
    items = [
        {"prompt": "p", "response": "a", "policy_hidden": h0},
        {"prompt": "p", "response": "b"},
        {"prompt": "p", "response": "c", "policy_hidden": h2},
    ]
    return {"items": items, "step": 1, "total_steps": 10}


def test_pack_and_unpack_round_trip_through_a_binary_body():
    request = tree()
    payload, tensors = pack_request(request)
    assert payload["items"][0]["policy_hidden"] == {"ref": "t0"} and payload["items"][2]["policy_hidden"] == {
        "ref": "t1"
    }
    assert isinstance(request["items"][0]["policy_hidden"], WireTensor)  # the input is not modified
    assert unpack_request(*decode_binary(encode_binary(payload, tensors))) == request


def test_pack_request_converts_arrays_and_rejects_reserved_ref_dicts():
    payload, tensors = pack_request({"h": [np.zeros((1, 2), np.float32), torch.zeros(1, 2)]})
    assert payload == {"h": [{"ref": "t0"}, {"ref": "t1"}]} and len(tensors) == 2
    with pytest.raises(WireError, match=r"items\[0\].meta: a dict whose only key is 'ref' is reserved"):
        pack_request({"items": [{"meta": {"ref": "x"}}]})
    with pytest.raises(WireError, match=r"items\[0\].h: dtype int64 is not supported"):
        pack_request({"items": [{"h": np.arange(3)}]})


def test_unpack_request_rejects_unknown_unused_and_malformed_refs():
    payload, tensors = pack_request(tree())
    payload["items"][1]["policy_hidden"] = {"ref": "t9"}
    with pytest.raises(WireError, match=r"^items\[1\].policy_hidden: references tensor 't9', which the body"):
        unpack_request(payload, tensors)

    payload, tensors = pack_request(tree())
    del payload["items"][2]["policy_hidden"]
    with pytest.raises(WireError, match=r"tensor\(s\) \['t1'\] are stored but no field references them"):
        unpack_request(payload, tensors)
    assert "policy_hidden" not in unpack_request(payload, tensors, strict=False)["items"][2]

    payload, tensors = pack_request(tree())
    payload["items"][0]["policy_hidden"] = {"ref": 0}
    with pytest.raises(WireError, match=r"^items\[0\].policy_hidden.ref: a tensor reference is a string"):
        unpack_request(payload, tensors, strict=False)


def test_jsonify_request_round_trips_through_tensor_from_json():
    request = tree()
    body = json.loads(json.dumps(jsonify_request(request)))
    for i in (0, 2):
        back = tensor_from_json(body["items"][i]["policy_hidden"], f"items[{i}].policy_hidden")
        assert back == request["items"][i]["policy_hidden"]
    assert body["items"][1] == {"prompt": "p", "response": "b"} and body["step"] == 1
