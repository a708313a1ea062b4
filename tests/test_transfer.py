"""Half-precision weight transfer (fed_ndif.transfer): what travels and what is rebuilt."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from fed_ndif.errors import FedNdifError
from fed_ndif.transfer import decode_update, encode_global, encode_update, received_weights


def _weights(seed: int) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return OrderedDict([("conv.weight", rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32)),
                        ("norm.bias", rng.normal(0, 1.0, (8,)).astype(np.float32)),
                        ("steps", np.array(17, np.int64))])


def test_half_precision_sends_half_the_bytes_and_keeps_counters():
    weights = _weights(0)
    sent = encode_global(weights, "float16")
    assert sent["conv.weight"].dtype == np.float16 and sent["steps"].dtype == np.int64
    float_bytes = sum(a.nbytes for n, a in weights.items() if n != "steps")
    assert sum(a.nbytes for n, a in sent.items() if n != "steps") * 2 == float_bytes
    assert encode_global(weights, "float32")["conv.weight"].dtype == np.float32


def test_a_sites_change_is_rebuilt_far_more_precisely_than_its_weights_in_float16():
    global_weights = _weights(0)
    received = received_weights(global_weights, "float16")
    rng = np.random.default_rng(1)
    trained = OrderedDict((n, a + rng.normal(0, 1e-3, a.shape).astype(np.float32)
                           if a.dtype == np.float32 else a + 1) for n, a in received.items())
    update = encode_update(trained, received, "float16")
    assert update["conv.weight"].dtype == np.float16
    rebuilt = decode_update(update, received, "float16")
    assert rebuilt["conv.weight"].dtype == np.float32 and rebuilt["steps"] == 18
    for name in ("conv.weight", "norm.bias"):
        error = np.abs(rebuilt[name] - trained[name]).max()
        naive = np.abs(trained[name].astype(np.float16).astype(np.float32) - trained[name]).max()
        assert error < 2e-6 < naive / 10, name


def test_float32_transfer_sends_the_weights_themselves():
    trained = _weights(2)
    assert encode_update(trained, _weights(0), "float32") is not trained
    for name, value in encode_update(trained, _weights(0), "float32").items():
        np.testing.assert_array_equal(value, trained[name])
    assert decode_update(trained, _weights(0), "float32")["norm.bias"] is trained["norm.bias"]


def test_an_update_that_does_not_fit_is_passed_on_for_the_checks_to_reject():
    received = received_weights(_weights(0), "float16")
    wrong_shape = encode_update(received, received, "float16")
    wrong_shape["norm.bias"] = np.zeros(5, np.float16)
    assert decode_update(wrong_shape, received, "float16")["norm.bias"].shape == (5,)
    missing = encode_update(received, received, "float16")
    del missing["norm.bias"]
    assert "norm.bias" not in decode_update(missing, received, "float16")


def test_unknown_dtype_and_overflow_are_refused_by_name():
    with pytest.raises(FedNdifError, match="bfloat16"):
        encode_global(_weights(0), "bfloat16")
    huge = _weights(0)
    huge["norm.bias"][0] = 1e6
    with pytest.raises(FedNdifError, match=r"norm\.bias"):
        encode_global(huge, "float16")


def test_packed_records_travel_as_two_arrays_and_round_trip_exactly():
    from flwr.app import Array, ArrayRecord

    from fed_ndif.run_config import INDEX, PACKED, from_array_record, to_array_record

    weights = _weights(0)
    weights["half"] = np.linspace(-1, 1, 7).astype(np.float16)
    record = to_array_record(weights, packed=True)
    assert list(record.keys()) == [INDEX, PACKED]
    back = from_array_record(record)
    assert list(back) == list(weights)
    for name, value in weights.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)
    assert to_array_record(weights, packed=True).count_bytes() < to_array_record(
        weights).count_bytes()
    payload = record[PACKED].numpy()
    truncated = ArrayRecord({INDEX: record[INDEX], PACKED: Array(payload[:-4].copy())})
    with pytest.raises(ValueError, match="past the end"):
        from_array_record(truncated)
    padded = ArrayRecord({INDEX: record[INDEX],
                          PACKED: Array(np.concatenate([payload, np.zeros(3, np.uint8)]))})
    with pytest.raises(ValueError, match="beyond the index"):
        from_array_record(padded)
    garbled = ArrayRecord({INDEX: Array(np.frombuffer(b"{not json", np.uint8).copy()),
                           PACKED: record[PACKED]})
    with pytest.raises(ValueError, match="malformed index"):
        from_array_record(garbled)
