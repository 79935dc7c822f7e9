import json

import pytest

from models.errors import BadRecord
from models.events import Recommendation
from pipeline.records import decode_event, dlq_headers, encode_event, encode_recommendation

NOW = 1_800_000_000_000


def _value(**kw):
    obj = {"user_id": "u1", "item_id": "i1", "event_type": "click", "timestamp": 1_700_000_000_000}
    obj.update(kw)
    return json.dumps(obj).encode()


def test_valid_event_with_iso_timestamp():
    e = decode_event(b"u1", _value(timestamp="2023-11-14T22:13:20Z", event_type="purchase"), 4096, NOW)
    assert (e.user_id, e.item_id, e.event_type, e.timestamp_ms) == ("u1", "i1", 1, 1_700_000_000_000)
    assert decode_event(b"u1", _value(timestamp="2023-11-14T22:13:20"), 4096, NOW).timestamp_ms == 1_700_000_000_000


@pytest.mark.parametrize(
    "key,value,reason",
    [
        (b"u1", b"{not json", "invalid_json"),
        (b"u1", b"\xff\xfe", "invalid_json"),
        (b"u1", b"[1, 2]", "not_an_object"),
        (b"u1", json.dumps({"user_id": "u1", "event_type": "click", "timestamp": 1}).encode(), "missing_field"),
        (b"u1", _value(item_id=["x"]), "wrong_type"),
        (b"u1", _value(event_type="view"), "unknown_event_type"),
        (b"u1", _value(timestamp="yesterday"), "bad_timestamp"),
        (b"u1", _value(timestamp=12), "absurd_timestamp"),
        (b"u1", _value(timestamp=NOW + 3 * 86_400_000), "absurd_timestamp"),
        (b"u1", _value(item_id="x" * 5000), "too_large"),
        (b"u2", _value(), "key_mismatch"),
        (None, _value(), "missing_key"),
        (b"u1", None, "empty_value"),
        (b"u1", b"", "empty_value"),  # was reported as invalid_json
        (b"u1", _value(user_id=""), "bad_value"),
        (b"u1", _value(user_id="u" * 300), "bad_value"),
    ],
)
def test_bad_records_name_their_reason_without_payload(key, value, reason):
    with pytest.raises(BadRecord) as info:
        decode_event(key, value, 4096, NOW)
    assert info.value.reason == reason
    assert "u1" not in str(info.value) and "i1" not in str(info.value)


def test_every_dead_letter_reason_is_reachable_and_listed_in_the_readme():
    import re
    from pathlib import Path

    from models.errors import DEAD_LETTER_REASONS

    reached = {case[2] for case in test_bad_records_name_their_reason_without_payload.pytestmark[0].args[1]}
    reached.add("forget_without_user")  # test_an_erasure_request_needs_a_key_and_may_have_no_value
    assert reached == set(DEAD_LETTER_REASONS)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("<!-- dead-letter reasons -->")[1]
    listed = re.findall(r"^\| `([a-z_]+)` \| (.+) \|$", section.split("\n\n")[1], flags=re.M)
    assert dict(listed) == DEAD_LETTER_REASONS  # the README's table is the code's, reason by reason


def test_wire_round_trip_and_recommendation_schema():
    e = decode_event(b"u1", _value(event_id="e7", session_id="s"), 4096, NOW)
    key, value = encode_event(e)
    assert decode_event(key, value, 4096, NOW) == e
    rec = Recommendation("u1", "e7", ["a", "b"], [1.5, 0.5], "lstm", "v1", 1_700_000_000_000)
    key, value = encode_recommendation(rec, 1_700_000_000_250)
    out = json.loads(value)
    assert key == b"u1"
    assert out == {
        "user_id": "u1", "event_id": "e7", "items": [{"item_id": "a", "score": 1.5}, {"item_id": "b", "score": 0.5}],
        "strategy": "lstm", "model_version": "v1", "event_timestamp": 1_700_000_000_000, "emitted_at": 1_700_000_000_250,
    }


def test_dlq_headers():
    headers = dict(dlq_headers("events", 3, 42, BadRecord("invalid_json", "value is not valid UTF-8 JSON")))
    assert headers["recur.original.topic"] == b"events"
    assert headers["recur.original.partition"] == b"3" and headers["recur.original.offset"] == b"42"
    assert headers["recur.error.reason"] == b"invalid_json" and headers["recur.error.class"] == b"BadRecord"


def test_an_erasure_request_needs_a_key_and_may_have_no_value():
    from pipeline.records import decode_forget, encode_forget, encode_forget_report

    key, value = encode_forget("u1", "req-1", 1_700_000_000_000)
    assert key == b"u1" and decode_forget(key, value, 2, 40) == (b"u1", "req-1")
    assert decode_forget(b"u1", None, 2, 40) == (b"u1", "2-40")  # a shop's own tombstone-like request
    assert decode_forget(b"u1", b"{not json", 2, 41) == (b"u1", "2-41")
    for bad in (None, b""):
        with pytest.raises(BadRecord) as info:
            decode_forget(bad, value, 2, 42)
        assert info.value.reason == "forget_without_user"
    rkey, report = encode_forget_report("req-1", "state", had_state=True, seconds=0.01)
    assert rkey == b"req-1" and json.loads(report) == {"request_id": "req-1", "part": "state", "had_state": True,
                                                      "seconds": 0.01}
    assert b"u1" not in report  # reports carry no user id
