"""Every import parser, fed arbitrary bytes or records, raises only ParseError; chunked == whole."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import polars as pl
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stresswatch.errors import ParseError
from stresswatch.importing import InputFile
from stresswatch_adapters.apple_health import AppleHealthParser, beat_times_ns, chunk_to_frame, parse_time_of_day
from stresswatch_adapters.fit import decode_fit
from stresswatch_adapters.fitbit import FitbitSource, parse_fitbit_json
from stresswatch_adapters.openmhealth import parse_omh
from stresswatch_adapters.tabular import MappedTableSource

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
_spec = importlib.util.spec_from_file_location("fitenc", FIXTURES / "fit" / "fitenc.py")
assert _spec and _spec.loader
fitenc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fitenc)

FIT_ACTIVITY = (FIXTURES / "fit" / "activity.fit").read_bytes()
APPLE = (FIXTURES / "apple_health" / "export.xml").read_bytes()
OMH = (FIXTURES / "openmhealth" / "points.json").read_bytes()
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def only_parse_errors(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except ParseError:
        pass


@FAST
@given(st.binary(max_size=2000))
def test_fit_arbitrary_bytes(data: bytes):
    only_parse_errors(decode_fit, data, source="x.fit")


@FAST
@given(st.binary(min_size=0, max_size=64), st.integers(0, len(FIT_ACTIVITY) - 1), st.integers(0, 255))
def test_fit_mutated_real_file(tail: bytes, pos: int, byte: int):
    data = bytearray(FIT_ACTIVITY)
    data[pos] = byte
    only_parse_errors(decode_fit, bytes(data) + tail, source="x.fit")
    only_parse_errors(decode_fit, bytes(data[:pos]), source="x.fit")


# (message, field) -> (base type, allowed element counts): the FIT profile's layouts
_PROFILE = {
    20: {253: (fitenc.UINT32, (1,)), 3: (fitenc.UINT8, (1,))},
    78: {0: (fitenc.UINT16, (1, 2, 5))},
    55: {253: (fitenc.UINT32, (1,)), 26: (fitenc.UINT16, (1,)), 27: (fitenc.UINT8, (1,))},
    132: {253: (fitenc.UINT32, (1,)), 0: (fitenc.UINT16, (1,)), 6: (fitenc.UINT8, (1, 8)), 9: (fitenc.UINT32, (1,)), 10: (fitenc.BYTE, (12,))},
}
_MAX = {fitenc.UINT8: 255, fitenc.BYTE: 255, fitenc.UINT16: 65535, fitenc.UINT32: 2**32 - 1}


@st.composite
def fit_messages(draw):
    msgs = []
    for local in range(draw(st.integers(1, 6))):
        global_num = draw(st.sampled_from(sorted(_PROFILE)))
        nums = draw(st.lists(st.sampled_from(sorted(_PROFILE[global_num])), min_size=1, max_size=5, unique=True))
        layout = [(n, draw(st.sampled_from(_PROFILE[global_num][n][1])), _PROFILE[global_num][n][0]) for n in nums]
        rows = [[[draw(st.integers(0, _MAX[b])) for _ in range(c)] for _, c, b in layout] for _ in range(draw(st.integers(1, 4)))]
        msgs.append((local, global_num, layout, rows))
    return msgs


@FAST
@given(fit_messages())
def test_fit_profile_shaped_files_with_any_values(messages):
    """Well-formed FIT files holding any values (invalid markers, wraps, out-of-order beats,
    packed beats before an anchor): a ParseError or consistent series, nothing else."""
    w = fitenc.FitWriter()
    for local, global_num, layout, rows in messages:
        w.define(local, global_num, layout)
        for row in rows:
            w.data(local, row)
    try:
        s = decode_fit(w.to_bytes(), source="gen.fit")
    except ParseError:
        return
    assert len(s.hr_time_ns) == len(s.hr_bpm) and len(s.rr_time_ns) == len(s.rr_ms)


@FAST
@given(st.binary(max_size=2000))
def test_apple_health_arbitrary_bytes(data: bytes):
    def run() -> None:
        p = AppleHealthParser(source="x.xml")
        p.feed(data)
        p.close()
        chunk_to_frame(p.take(), "u")

    only_parse_errors(run)


@FAST
@given(st.integers(0, len(APPLE)), st.binary(max_size=40))
@example(31, b"-")  # turns the declared encoding into an unknown one (found by hypothesis)
def test_apple_health_cut_and_spliced(pos: int, junk: bytes):
    def run() -> None:
        p = AppleHealthParser(source="x.xml")
        p.feed(APPLE[:pos] + junk + APPLE[pos:])
        p.close()
        chunk_to_frame(p.take(), "u")

    only_parse_errors(run)


@FAST
@given(st.text(max_size=30), st.lists(st.text(max_size=20), max_size=5))
def test_apple_health_times_never_raise(start: str, times: list[str]):
    parse_time_of_day(start)
    assert len(beat_times_ns(start, times)) == len(times)


@FAST
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=8))
def test_apple_health_feeding_in_pieces_equals_feeding_whole(cuts: list[int]):
    whole = AppleHealthParser()
    whole.feed(APPLE)
    whole.close()
    a, _ = chunk_to_frame(whole.take(), "u")
    pieces = AppleHealthParser()
    frames = []
    pos = 0
    for c in cuts:
        pieces.feed(APPLE[pos : pos + c])
        pos += c
        frames.append(chunk_to_frame(pieces.take(), "u")[0])
    pieces.feed(APPLE[pos:])
    pieces.close()
    frames.append(chunk_to_frame(pieces.take(), "u")[0])
    assert pl.concat(frames).equals(a)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@FAST
@given(st.binary(max_size=500))
def test_fitbit_json_arbitrary_bytes(data: bytes):
    only_parse_errors(parse_fitbit_json, data, source="heart_rate-2026-01-01.json")


@FAST
@given(st.lists(st.dictionaries(st.sampled_from(["dateTime", "value", "bpm"]), json_values, max_size=3), max_size=5))
def test_fitbit_json_arbitrary_records(records):
    def run() -> None:
        src = FitbitSource(Path("heart_rate-2026-01-01.json"), user="u")
        inp = InputFile("heart_rate-2026-01-01.json", 0, lambda: __import__("io").BytesIO(json.dumps(records).encode()))
        list(src.parse(inp))

    only_parse_errors(run)


@FAST
@given(st.binary(max_size=500))
def test_fitbit_csv_and_table_arbitrary_bytes(data: bytes):
    import io

    def fitbit() -> None:
        list(FitbitSource(Path("."), user="u").parse(InputFile("heart_rate_2026-01-01.csv", 0, lambda: io.BytesIO(data))))

    def table() -> None:
        src = MappedTableSource(Path("."), user="u", mapping={"time": "a", "value": "b"}, metric="hr_bpm")
        list(src.parse(InputFile("t.csv", 0, lambda: io.BytesIO(b"a,b\n" + data))))

    only_parse_errors(fitbit)
    only_parse_errors(table)


@FAST
@given(st.binary(max_size=500))
def test_openmhealth_arbitrary_bytes(data: bytes):
    only_parse_errors(parse_omh, data, source="x.json")
    only_parse_errors(parse_omh, data, source="x.ndjson", ndjson=True)


@FAST
@given(json_values)
def test_openmhealth_arbitrary_records(doc):
    only_parse_errors(parse_omh, json.dumps(doc).encode(), source="x.json")


@FAST
@given(st.data())
def test_openmhealth_mutated_points(data):
    points = json.loads(OMH)
    i = data.draw(st.integers(0, len(points) - 1))
    part = data.draw(st.sampled_from(["header", "body"]))
    key = data.draw(st.sampled_from(sorted(points[i][part])))
    points[i][part][key] = data.draw(json_values)

    def run() -> None:
        import io

        src = __import__("stresswatch_adapters.openmhealth", fromlist=["OpenMHealthSource"]).OpenMHealthSource(Path("."), user="u")
        list(src.parse(InputFile("x.json", 0, lambda: io.BytesIO(json.dumps(points).encode()))))

    only_parse_errors(run)


@FAST
@given(
    st.sampled_from(["2022-12-01 18:14:47 +0100", "2022-12-01 23:59:58 -0530", "2023-03-26 00:00:01 +0000", "bad"]),
    st.lists(
        st.one_of(
            st.builds(
                lambda h, m, s, f, sep, mark: f"{h}:{m:02d}:{s:02d}{f}{sep}{mark}",
                st.integers(0, 25), st.integers(0, 61), st.integers(0, 61),
                st.sampled_from(["", ".5", ".94", ",52", ".123456"]),
                st.sampled_from(["", " ", "\u202f", "\xa0"]),
                st.sampled_from(["", "AM", "PM", "pm", "a.m."]),
            ),
            st.text(max_size=12),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_apple_health_vectorised_beats_equal_the_scalar_definition(start: str, times: list[str]):
    from stresswatch_adapters.apple_health import AppleChunk, _rr_from_beats
    from collections import Counter

    scalar = beat_times_ns(start, times)
    expected = []
    prev = None
    for t in scalar:
        if t is None:
            continue
        if prev is not None:
            expected.append((t, round((t - prev) / 1e6, 3)))
        prev = t
    chunk = AppleChunk(beat_text=times, beat_record=[0] * len(times), sdnn_start=[start], sdnn_source=["s"])
    rejected: Counter[str] = Counter()
    got = _rr_from_beats(chunk, "u", rejected)
    assert list(zip(got["time"].dt.epoch("ns").to_list(), got["value"].to_list())) == expected
    assert sum(rejected.values()) == sum(t is None for t in scalar)
